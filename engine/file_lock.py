"""An exclusive, non-blocking flock that records its holder: the --save lock of training and the
--output-prefix lock of preprocessing both use it. The kernel drops the lock when its holder dies,
even by SIGKILL, so a crashed run never leaves a stale lock; the recorded pid, host and start time
are what a second run's error message names."""

from __future__ import annotations

import fcntl
import os
import socket
import time


def lock_or_holder(fd: int) -> str | None:
    """Locks the open file `fd` and records this process in it (None), or, when another process holds
    it, returns what that holder recorded ("" if nothing). Other OSErrors (a filesystem without
    flock) propagate."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    return None
