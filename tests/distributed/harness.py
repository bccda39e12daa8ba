"""Run a function or a CLI on N gloo ranks on CPU, for tests.

Each rank is a fresh process with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a free port), forked from a server that imported torch,
megatron-core and the engine once per session. A failing rank's traceback is raised in the
test; a hung group is killed after `timeout` seconds. `run_cli` runs a CLI's `main(argv)` that
way; `run_torchrun` launches the real `torchrun` (slower: every rank imports everything again).
"""

from __future__ import annotations

import os
import importlib
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


# Importing torch, megatron-core and the engine costs ~10 s of CPU per process, more than most tests
# compute. Ranks fork from one server process that imported them once per test session; each rank is
# still a fresh process with its own parallel state, as under torchrun.
PRELOAD = ["torch", "megatron.core", "engine.training.trainer", "pretrain_dpo", "tests.distributed.harness"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Call `fn(*args)` on `world_size` ranks; returns the per-rank return values in rank order."""
    ctx = _context()
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


def _cli_main(module: str, argv: list[str], env: dict[str, str], cwd: str, log_dir: str) -> int:
    """One rank of a CLI: its stdout and stderr go to files (file descriptors, so logging and C code too)."""
    rank = os.environ["RANK"]
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, name in ((1, "out"), (2, "err")):
        with open(os.path.join(log_dir, f"rank{rank}.{name}"), "w") as stream:
            os.dup2(stream.fileno(), fd)
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit_:  # argparse errors, sys.exit("message") in the CLI
        code = exit_.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception: traceback, exit code 1
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code or 0


def run_cli(module: str, args: list[str], nproc: int, timeout: float = 600, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc <module>.py args`, with ranks forked from the preloaded server.

    Returns a finished process: stdout and stderr are the ranks' output in rank order; the exit code is
    the first failing rank's own (torchrun would report 1 for any failure).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="run_cli_") as log_dir:
        codes = run_ranks(_cli_main, nproc, module, list(args), dict(env or {}), str(cwd or REPO_ROOT), log_dir,
                          timeout=timeout)
        stdout, stderr = ("".join(Path(log_dir, f"rank{r}.{name}").read_text() for r in range(nproc))
                          for name in ("out", "err"))
    failed = [code for code in codes if code != 0]
    return subprocess.CompletedProcess([module, *args], failed[0] if failed else 0, stdout, stderr)


def _cli_process(module: str, argv: list[str], env: dict[str, str], cwd: str, log_dir: str) -> None:
    os.environ.update(_rank_env(0, 1, free_port()))
    sys.exit(_cli_main(module, argv, env, cwd, log_dir))


class CliProcess:
    """A one-rank CLI run in the background (forked from the preloaded server), for signal and lock tests."""

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None):
        import tempfile

        self._logs = tempfile.TemporaryDirectory(prefix="cli_process_")
        self._process = _context().Process(
            target=_cli_process, args=(module, list(args), dict(env or {}), str(REPO_ROOT), self._logs.name))
        self._process.start()
        self.pid = self._process.pid

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def poll(self) -> int | None:
        return self._process.exitcode

    def stderr(self) -> str:
        path = Path(self._logs.name, "rank0.err")
        return path.read_text() if path.exists() else ""

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the exit; returns (exit code, stderr). A signal's exit code is minus its number."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            raise TimeoutError(f"the run did not finish within {timeout:.0f}s:\n{self.stderr()[-3000:]}")
        return self._process.exitcode, self.stderr()

    def kill(self) -> None:
        self._process.kill()
        self._process.join()


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
