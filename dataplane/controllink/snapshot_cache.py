"""The snapshot cache: the newest configuration snapshot a node has seen, in one file, so it
can start and keep forwarding while the control plane is down."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from ..basics import statefile
from ..contract.snapshot import ConfigSnapshot, SnapshotError, decode, encode

CACHE_MODE = 0o600


class _VersionOnly(msgspec.Struct):
    version: int


_version_decoder = msgspec.json.Decoder(_VersionOnly)


class SnapshotCache:
    """The newest snapshot a node has seen, in one file, so it can run without the control plane.

    ``save`` writes a new file (mode 0600), fsyncs it and renames it over the old one, so
    a crash leaves either the old or the new snapshot, never a torn one; it refuses to
    replace a snapshot of the same or a newer version. Processes sharing the file (edge
    workers) serialise ``save`` with an advisory lock on ``<path>.lock``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> ConfigSnapshot | None:
        """The stored snapshot; None when there is none yet; ``SnapshotError`` naming the file if unreadable."""
        data = self._read()
        if data is None:
            return None
        try:
            return decode(data)
        except SnapshotError as exc:
            raise SnapshotError(f"snapshot cache {self.path} is corrupt: {exc}") from None

    def stored_version(self) -> int | None:
        """The version of the stored snapshot; None when there is none or it cannot be read."""
        try:
            data = self._read()
            return None if data is None else _version_decoder.decode(data).version
        except (SnapshotError, msgspec.DecodeError):
            return None

    def save(self, snapshot: ConfigSnapshot, replace_newer: bool = False) -> bool:
        """Store ``snapshot`` if it is newer than the stored one (or none / a corrupt one is stored,
        or ``replace_newer``: the control plane went back to an older version).

        Returns whether it was written.
        """
        data = encode(snapshot)
        directory = self.path.parent
        try:
            statefile.make_private_directory(str(directory))
        except statefile.StateFileError as exc:
            raise SnapshotError(f"cannot create directory {directory} for the snapshot cache: "
                                f"{exc.reason}") from None
        with self._locked():
            stored = self.stored_version()
            if stored is not None and snapshot.version <= stored and not replace_newer:
                return False
            self._write(data)
        return True

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot cache {self.path}: {exc.strerror}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, CACHE_MODE)
        except OSError as exc:
            raise SnapshotError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        try:
            statefile.write_private(str(self.path), data, sync_directory=True)
        except statefile.StateFileError as exc:
            raise SnapshotError(f"cannot write snapshot cache {self.path}: {exc.reason}") from None
