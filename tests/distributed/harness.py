"""Run a function or a CLI on N gloo ranks on CPU, for tests.

Each rank is a fresh spawned process with the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port). A failing rank's traceback is
raised in the test; a hung group is killed after `timeout` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Layout:
    """One multi-rank case, declared as data and run by a parametrized test (its `name` is the test id)."""

    name: str
    ranks: int
    flags: str = ""
    tp: int = 1
    pp: int = 1

    @property
    def argv(self) -> list[str]:
        return self.flags.split()


def layout_cases(layouts: list[Layout]):
    """pytest.mark.parametrize over `layouts`, one named test per case, so one failure hides no other."""
    import pytest

    return pytest.mark.parametrize("layout", layouts, ids=[layout.name for layout in layouts])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # Many ranks share 2 cores: one thread each avoids oversubscription stalls.
        "OMP_NUM_THREADS": "1",
    }


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(_rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(*args)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        from engine.initialize import destroy_distributed

        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001 - teardown after a failure
            pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Call `fn(*args)` on `world_size` ranks; returns the per-rank return values in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            values[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [values[r] for r in range(world_size)]


def run_torchrun(script: str, args: list[str], nproc: int, timeout: float = 600, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Launch `torchrun --nproc-per-node nproc script args` and return the finished process.

    Output is captured; on a non-zero exit the caller gets the full log in the assertion.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd or REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
