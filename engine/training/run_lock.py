"""An exclusive lock on the --save directory, so two runs never interleave checkpoints there.

Global rank 0 holds an flock on SAVE/.engine.lock for the run's lifetime (engine/file_lock.py:
released by the kernel when the process ends, even by SIGKILL; the holder's pid, host and
start time are written into the file for the error message a second run gets).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.file_lock import lock_or_holder
from engine.platform import current_device

LOCK_FILE = ".engine.lock"


class SaveDirLockedError(RuntimeError):
    pass


class SaveDirLock:
    def __init__(self, save_dir: str):
        self.path = Path(save_dir) / LOCK_FILE
        self.fd: int | None = None

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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        holder = lock_or_holder(fd)
        if holder is not None:
            os.close(fd)
            return (f"--save {self.path.parent} is in use by another run ({holder or 'unknown process'}); "
                    "wait for it to finish or choose another --save directory")
        self.fd = fd
        return ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
