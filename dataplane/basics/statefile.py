"""Private state files: the one way a node writes what it keeps on disk.

Keys, certificates, ``node.json``, the configuration snapshot cache, the client's session,
forwarding profile and status files are all written by ``write_file``: the data goes to a
new file next to the target, created with its final mode from the start (0600 unless a
wider mode is asked for, as for certificates), is flushed to disk, and then renamed over
the target (with ``sync_directory`` the rename is flushed too: the snapshot cache, which a
node must find after a crash). A reader therefore sees the old
file or the new one, never a torn one, and a private file never exists with wider
permissions, not even briefly. ``make_private_directory`` creates a directory 0700.
"""

from __future__ import annotations

import os

PRIVATE = 0o600


class StateFileError(Exception):
    """A state file or directory cannot be written; ``reason`` is the system's (strerror)."""

    def __init__(self, path: str, reason: str, what: str = "write") -> None:
        super().__init__(f"cannot {what} {path}: {reason}")
        self.path = path
        self.reason = reason


def write_file(path: str, data: bytes, mode: int = PRIVATE, *, sync_directory: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically: a new file created with ``mode``, flushed, renamed
    (and the directory flushed after the rename with ``sync_directory``)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise StateFileError(path, exc.strerror or str(exc)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateFileError(path, exc.strerror or str(exc)) from None
    if not sync_directory:
        return
    try:  # make the rename itself durable
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the file itself is complete


def write_private(path: str, data: bytes, *, sync_directory: bool = False) -> None:
    """``write_file`` with mode 0600."""
    write_file(path, data, PRIVATE, sync_directory=sync_directory)


def make_private_directory(directory: str) -> None:
    """Create ``directory`` (and its parents) with mode 0700 if it does not exist."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StateFileError(directory, exc.strerror or str(exc), "create directory") from None
