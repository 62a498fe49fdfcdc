"""Output folders: writability checked before any work, the run-folder lock, stale temporaries.

    check_writable(folder, fix)        # FolderError naming the folder and the fix, or the folder
    with RunLock(out_dir): ...          # one training run per folder (an OS lock, issue 17)
    remove_stale_temporaries(out_dir)   # what a kill mid-write left behind

Errors are ValueErrors, so the CLI prints them as one line.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

LOCK_NAME = ".tgdp-run.lock"
# Temporaries of checkpoint.save_checkpoint (.{name}.XXXX.tmp) and link_atomically (.{name}.{pid}.tmp)
STALE_PATTERNS = (".*.pt.*.tmp",)


class FolderError(ValueError):
    """An output folder that cannot be used: a file, not creatable, not writable, or in use."""


def check_writable(folder: str | os.PathLike, fix: str, create: bool = True) -> Path:
    """Create ``folder`` if needed and write (and delete) a probe file in it.

    Raises FolderError "<folder> ...: <why>; <fix>" when the path is a file, cannot be created
    or cannot be written, so a long job fails at its start instead of at its first save.
    ``create=False`` leaves a missing folder uncreated and probes the nearest existing parent.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder; {fix}")
    probe_in = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            while not probe_in.exists() and probe_in != probe_in.parent:
                probe_in = probe_in.parent
            if not probe_in.is_dir():
                raise NotADirectoryError(f"{probe_in} is a file")
    except OSError as err:
        raise FolderError(f"cannot create the folder {path} ({err.strerror or err}); {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".tgdp-write-test-", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = f"the folder {path}" if probe_in == path else f"{probe_in}, where the folder {path} would be made"
        raise FolderError(f"cannot write to {where} ({err.strerror or err}); {fix}") from None
    return path


class RunLock:
    """An exclusive lock on ``folder/.tgdp-run.lock``, held while a training run writes the folder.

    An OS lock (flock), not a marker file: the kernel drops it when the process ends, however it
    ends, so a killed run never leaves the folder locked. The file holds the holder's pid, host,
    start time and command line; a second run into the folder raises FolderError naming them.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+")
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise FolderError(f"{self.path.parent} is in use by another training run ({holder}); wait for it "
                              "to finish, or choose another out_dir (--out)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Unlock (the file stays: deleting it would let two runs lock two different files)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(f) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError when held
    else:  # pragma: no cover - Windows
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "its holder is starting up"


def remove_stale_temporaries(folder: str | os.PathLike, patterns: tuple[str, ...] = STALE_PATTERNS) -> list[Path]:
    """Delete the temporary checkpoint files a kill mid-write left in ``folder``; returns them.

    Call it only while holding the folder's RunLock: another live run's temporaries match too.
    """
    removed = []
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
