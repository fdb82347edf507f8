"""What the control plane keeps on disk about sign-ins, served for real (``python -m dataplane
control`` in a subprocess, SQLite in its data directory):

- ``control.db`` and its ``-wal`` / ``-shm`` files are mode 0600 even when the data directory
  is world-writable and the umask lets everything through, and files an older version left
  wider are made 0600 at start; ``secrets.key`` is 0600;
- a TOTP secret enrolled through the API is nowhere in the database files in the clear, nor
  are the recovery codes or their SHA-256; sign-in with them works;
- a control plane given another ``secrets.key`` than the one its database was sealed with
  refuses to start, saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyotp
import pytest

from controlplane import ROOT, Control, environment, free_port

pytestmark = pytest.mark.timeout(90)

PASSWORD = "correct horse battery"
DATABASE_FILES = ("control.db", "control.db-wal", "control.db-shm")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    """The process umask (inherited by the control plane started meanwhile) set to ``value``."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def database_bytes(data_dir: Path) -> bytes:
    return b"".join((data_dir / name).read_bytes() for name in DATABASE_FILES if (data_dir / name).exists())


def test_the_database_files_are_private_whatever_the_directory_and_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o777)
    data_dir.chmod(0o777)
    with umask(0), Control.running(data_dir) as control:
        assert control.call("POST", "/v1/users", {"upn": "amy@corp.example", "password": PASSWORD})[0] == 201
        for name in DATABASE_FILES:
            assert mode(data_dir / name) == 0o600, name
        assert mode(data_dir / "secrets.key") == 0o600
    # Files an older version left readable by everyone are made private at the next start.
    for name in DATABASE_FILES:
        if (data_dir / name).exists():
            (data_dir / name).chmod(0o644)
    with umask(0), Control.running(data_dir) as control:
        assert control.call("GET", "/v1/users/amy@corp.example")[0] == 200
        for name in DATABASE_FILES:
            assert mode(data_dir / name) == 0o600, name


def test_totp_secrets_and_recovery_codes_are_not_on_disk_in_the_clear(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Control.running(data_dir) as control:
        assert control.call("POST", "/v1/users", {"upn": "ben@corp.example", "password": PASSWORD})[0] == 201
        status, body, _ = control.call("POST", "/v1/auth/sign-in", {"upn": "ben@corp.example", "password": PASSWORD},
                                       key=None)
        assert status == 200, body
        token = body["access_token"]
        status, enrol, _ = control.call("POST", "/v1/auth/totp/enrol", bearer=token)
        assert status == 200, enrol
        secret = enrol["secret"]
        if 30 - time.time() % 30 < 2:
            time.sleep(2)
        status, confirmed, _ = control.call("POST", "/v1/auth/totp/confirm", {"code": pyotp.TOTP(secret).now()},
                                            bearer=token)
        assert status == 200, confirmed
        codes = confirmed["recovery_codes"]
        on_disk = database_bytes(data_dir)
        assert secret.encode() not in on_disk
        for code in codes:
            raw = code.replace("-", "")
            assert raw.encode() not in on_disk and code.encode() not in on_disk
            assert hashlib.sha256(raw.encode()).hexdigest().encode() not in on_disk
        assert on_disk.count(b"$argon2id$") >= 10 + 1  # the codes and the password
        status, body, _ = control.call("POST", "/v1/auth/sign-in", {"upn": "ben@corp.example", "password": PASSWORD,
                                                                    "recovery_code": codes[0]}, key=None)
        assert status == 200, body
    # Another secrets key cannot read the sealed secret: the control plane says so and does not start.
    (data_dir / "secrets.key").write_text("A" * 43 + "=\n")
    done = subprocess.run([sys.executable, "-m", "dataplane", "control", "--listen", f"127.0.0.1:{free_port()}"],
                          cwd=ROOT, env=environment(data_dir), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "the TOTP secrets in this database cannot be read: the sealed value does not open with secrets key" \
        in done.stderr
    assert "Every control-plane node of one database needs the same secrets.key" in done.stderr


def _locks_held(pid: int, path: Path) -> int:
    """POSIX locks process ``pid`` holds on ``path`` (``/proc/locks``)."""
    inode = path.stat().st_ino
    held = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "POSIX" and int(fields[4]) == pid and int(fields[5].rsplit(":", 1)[1]) == inode:
            held += 1
    return held


def test_a_new_connection_keeps_sqlites_locks_on_the_shared_memory_file(tmp_path: Path) -> None:
    """The -wal/-shm modes are checked at every new connection. Opening and closing the files
    for that released every POSIX lock this process held on them, SQLite's 'in use' lock on
    -shm included: another process opening the database (a backup, the sqlite3 shell, a test)
    then reset the wal-index under the control plane's memory map, which died of SIGBUS."""
    import sqlite3

    from sqlalchemy import text

    from control.store import open_store

    database = tmp_path / "control.db"
    store = open_store(f"sqlite:///{database}")
    try:
        shm = Path(f"{database}-shm")
        with store.engine.connect() as first:
            first.execute(text("SELECT 1")).all()
            assert _locks_held(os.getpid(), shm) >= 1  # SQLite marks the database in use
            with store.engine.connect() as second:  # a new pooled connection: its modes are checked
                second.execute(text("SELECT 1")).all()
                assert _locks_held(os.getpid(), shm) >= 1, "a new connection released SQLite's locks"
                size = shm.stat().st_size
                with contextlib.closing(sqlite3.connect(database)) as other:  # another reader, then gone
                    other.execute("SELECT count(*) FROM sqlite_master").fetchall()
                assert shm.stat().st_size == size
                first.execute(text("SELECT 1")).all()  # the memory map is still good
    finally:
        store.engine.dispose()
