"""An exclusive lock on the --save directory, so two runs never interleave checkpoints there.

Global rank 0 holds an flock on SAVE/.engine.lock for the run's lifetime; the kernel
releases it when the process ends, even by SIGKILL, so a crashed run never leaves a
stale lock. The holder's pid, host and start time are written into the file for the
error message a second run gets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.platform import current_device

LOCK_FILE = ".engine.lock"


class SaveDirLockedError(RuntimeError):
    pass


class SaveDirLock:
    def __init__(self, save_dir: str):
        self.path = Path(save_dir) / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        """Collective: rank 0 takes the lock and every rank raises if it could not."""
        message = ""
        if dist.get_rank() == 0:
            message = self._try_lock()
        failed = torch.tensor([1 if message else 0], device=current_device())
        dist.broadcast(failed, src=0)
        if failed.item():
            box = [message]
            dist.broadcast_object_list(box, src=0)
            raise SaveDirLockedError(box[0])

    def _try_lock(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            return (f"--save {self.path.parent} is in use by another run ({holder}); "
                    "wait for it to finish or choose another --save directory")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle
        return ""

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
