"""Accelerator and process-group backend, and the CPU adaptor for megatron-core.

On CUDA the engine uses NCCL and this module touches nothing. Without CUDA it uses
gloo on CPU, and megatron-core 0.15/0.16 needs a bounded set of its CUDA
assumptions bridged. This is the project's single sanctioned patch set: it is
installed by an explicit call (from `engine.initialize`), never on import, and
every bridged call site is listed in `CPU_ADAPTOR_SITES` and covered by
`tests/unit/test_platform.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# megatron-core minor versions whose CUDA call sites were audited for the adaptor. Newer releases (up to
# 0.19.x, Python >= 3.12) are supported on CUDA, where the adaptor is not used; CPU runs need one of these.
CHECKED_MEGATRON_CORE = ("0.15", "0.16")

# What the adaptor bridges, one line per call site family (documentation and tests).
CPU_ADAPTOR_SITES = (
    "torch.cuda.current_device() -> cpu device (layers incl. their backward, rotary, p2p buffers)",
    "torch.cuda.synchronize() -> no-op (p2p communication)",
    "factory calls with device='cuda' and Tensor.cuda()/Tensor.to('cuda') -> cpu "
    "(optimizer, grad scaler, clip_grads, param/grad buffers, schedules)",
    "Tensor.type() -> 'torch.cuda.*Tensor' names (clip_grads and mixed-precision optimizer asserts)",
    "torch.cuda.get_rng_state/set_rng_state/manual_seed -> CPU default generator",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state -> CPU generator",
    "torch.cuda.Stream()/current_stream()/stream(...) -> a stream stand-in whose waits do nothing, a null context "
    "(MoEAlltoAllTokenDispatcher's device-to-host stream, the shared expert's overlap stream)",
    "megatron.core.transformer.moe.moe_utils.te_general_gemm -> None when transformer-engine is absent "
    "(0.16.1 leaves the name undefined and the router's gating linear reads it: NameError)",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu -> numpy split sizes from CPU tensors "
    "too (the alltoall dispatcher's all_to_all_single split sizes; megatron converts only CUDA tensors)",
    "megatron.core.tensor_parallel.mappings._gather_along_first_dim/_reduce_scatter_along_first_dim with split "
    "sizes -> equal-size gloo collectives (the alltoall dispatcher's uneven TP gather and its backward; gloo's "
    "all_gather refuses tensors of different sizes)",
)


@dataclass(frozen=True)
class Platform:
    """Where tensors live and how ranks talk."""

    device_type: str
    """'cuda' or 'cpu'."""
    backend: str
    """torch.distributed backend: 'nccl' on CUDA, 'gloo' on CPU."""

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()

    def bind_local_device(self, local_rank: int, local_world_size: int) -> None:
        """One GPU per rank on this node: rank LOCAL_RANK drives GPU LOCAL_RANK (no-op on CPU).

        More ranks than visible GPUs is an error, not a silent `local_rank % device_count` that would put
        two ranks (two copies of their model and optimizer) on one GPU.
        """
        if not self.is_cuda:
            return
        count = torch.cuda.device_count()
        if local_world_size > count or local_rank >= count:
            raise RuntimeError(
                f"{max(local_world_size, local_rank + 1)} ranks on this node (torchrun --nproc-per-node), but only "
                f"{count} GPU(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                f"launch at most {count} ranks per node, one per GPU"
            )
        torch.cuda.set_device(local_rank)

    def peak_memory_bytes(self) -> int:
        """Peak allocated accelerator memory since the last `reset_peak_memory()`; on CPU, the process's peak
        RSS since it started."""
        if self.is_cuda:
            return torch.cuda.max_memory_allocated()
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak_memory(self) -> None:
        """Starts a new peak for `peak_memory_bytes` on CUDA. On CPU there is nothing to reset: the kernel
        keeps one peak RSS per process, so the CPU figure stays the process's peak."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats()


DETERMINISTIC_ENV = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
"""What Megatron-LM's --deterministic-mode sets (megatron/training/determinism.py): NCCL's ring all-reduce,
whose reduction order is fixed; a fixed cuBLAS workspace, without which cuBLAS may pick a different split of a
GEMM from run to run (torch refuses cuBLAS under deterministic algorithms without it); transformer-engine's
deterministic attention kernels (megatron-core refuses TE attention under deterministic_mode otherwise)."""

DETERMINISTIC_VALUES = {"NCCL_ALGO": {"Ring", "CollnetDirect", "CollnetChain", "^NVLS"},
                        "CUBLAS_WORKSPACE_CONFIG": {":4096:8", ":16:8"}, "NVTE_ALLOW_NONDETERMINISTIC_ALGO": {"0"}}
"""Values a launcher may have set that keep runs deterministic (Megatron-LM's accepted lists; NCCL_ALGO is a
comma-separated list of them)."""


def enable_deterministic_mode() -> None:
    """--deterministic-mode: fills in `DETERMINISTIC_ENV` and turns on torch's deterministic algorithms.

    Runs before anything touches CUDA: NCCL reads NCCL_ALGO when it creates a communicator, cuBLAS its
    workspace setting when it creates a handle, TE its flag at its first attention. A value the launcher
    already set is kept when it is deterministic and refused, naming it, when not. On CPU the variables
    are inert and torch's flag changes nothing the engine runs.
    """
    for name, accepted in DETERMINISTIC_VALUES.items():
        value = os.environ.get(name)
        if value is None:
            continue
        tokens = [token.strip() for token in value.split(",")] if name == "NCCL_ALGO" else [value]
        if not all(token in accepted for token in tokens):
            raise ValueError(f"--deterministic-mode: {name}={value} is not deterministic; unset it or use "
                             f"{' or '.join(sorted(accepted))}")
    for name, value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)


def current_device() -> torch.device:
    """Where this rank's tensors, and the tensors of its collectives, live (the current CUDA device, set by
    initialize from LOCAL_RANK; NCCL needs CUDA tensors), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def accelerator_rng_state() -> torch.Tensor | None:
    """The CUDA generator's state (saved in checkpoints for exact resume), None without CUDA."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_accelerator_rng_state(state: torch.Tensor) -> None:
    """Restores `accelerator_rng_state()` where there is CUDA (a CPU run ignores a GPU run's state)."""
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)


def accelerator_name() -> str | None:
    """The GPU's product name (for its datasheet peak), None without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def detect_platform(backend: str | None = None) -> Platform:
    """CUDA + NCCL when a GPU is visible, else CPU + gloo; `backend` may only restate the pairing."""
    if torch.cuda.is_available():
        if backend == "gloo":
            raise ValueError(
                "--distributed-backend gloo on a machine with CUDA: the model and megatron-core's collectives "
                "live on the GPU, and gloo does not run most collectives on CUDA tensors; use nccl (the default), "
                "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU with gloo"
            )
        return Platform("cuda", backend or "nccl")
    if backend not in (None, "gloo"):
        raise ValueError(
            f"--distributed-backend {backend} needs CUDA, but no GPU is visible; use gloo on CPU"
        )
    return Platform("cpu", "gloo")


def unchecked_version_message(version: str) -> str | None:
    """Why the CPU adaptor refuses megatron-core `version`, or None when it was checked against it."""
    minor = ".".join(version.split(".")[:2])
    if minor in CHECKED_MEGATRON_CORE:
        return None
    checked = ", ".join(f"{v}.x" for v in CHECKED_MEGATRON_CORE)
    newer = tuple(int(p) for p in minor.split(".")) > tuple(int(p) for p in CHECKED_MEGATRON_CORE[-1].split("."))
    if newer:
        return (f"megatron-core {version} is newer than the versions the CPU adaptor was checked against ({checked}): "
                "its CUDA call sites on CPU are unaudited, so CPU runs refuse it. Run on CPU with Python 3.11 and "
                "megatron-core 0.16.1 (pip install 'megatron-core>=0.15,<0.17'); CUDA runs need no adaptor")
    return (f"megatron-core {version} is older than the versions the CPU adaptor was checked against ({checked}); "
            "pip install 'megatron-core>=0.15,<0.17'")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA tensor placement to the CPU and reports CPU tensors with CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name[len("torch.") :]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuEvent:
    """torch.cuda.Event on CPU: recorded work has already run, so the event is always complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuStream:
    """torch.cuda.Stream on CPU: work runs in program order, so there is nothing to wait for; a recorded
    event is complete at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        pass


_CURRENT_STREAM = CpuStream()


def _cpu_stream_context(stream: Any) -> contextlib.nullcontext:
    return contextlib.nullcontext(stream)


def _move_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's maybe_move_tensor_to_cpu, also for CPU tensors: the alltoall dispatcher's split sizes must
    reach all_to_all_single as host integers, never as tensors."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


def _uneven_gather(original: Callable) -> Callable:
    """megatron's gather along dim 0; uneven `output_split_sizes` go through an equal-size all_gather of
    zero-padded pieces (gloo has no uneven all_gather), the padding cut away after."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, output_split_sizes)])

    return gather


def _uneven_reduce_scatter(original: Callable) -> Callable:
    """megatron's reduce-scatter along dim 0; uneven `input_split_sizes` go through an all_reduce of the
    whole tensor, each rank keeping its own rows (gloo has no reduce_scatter of uneven pieces)."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return total.split(list(input_split_sizes), dim=0)[group.rank()].contiguous()

    return reduce_scatter


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


_ABSENT = object()
"""What `_patch` saves for a name the owner did not have (uninstall deletes it again)."""


class CpuAdaptor:
    """Installs and removes the patches listed in CPU_ADAPTOR_SITES. Idempotent."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode: CudaToCpuMode | None = None

    @property
    def installed(self) -> bool:
        return self._mode is not None

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name, _ABSENT)))
        setattr(owner, name, value)

    def install(self) -> None:
        if self.installed:
            return
        if torch.cuda.is_available():
            raise RuntimeError("the CPU adaptor is for machines without CUDA; a GPU is visible")
        import megatron.core
        from megatron.core.tensor_parallel import random as mcore_random

        version = megatron.core.__version__
        problem = unchecked_version_message(version)
        if problem:
            raise RuntimeError(problem)
        # A device object rather than an ordinal: megatron's autograd Functions allocate with
        # device=torch.cuda.current_device() in backward, where the function mode is not active.
        self._patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
        self._patch(torch.cuda, "synchronize", lambda device=None: None)
        self._patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        self._patch(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
        self._patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(seed))
        self._patch(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
        self._patch(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
        self._patch(torch.cuda, "Stream", CpuStream)
        self._patch(torch.cuda, "current_stream", lambda device=None: _CURRENT_STREAM)
        self._patch(torch.cuda, "stream", _cpu_stream_context)
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        if not hasattr(moe_utils, "te_general_gemm"):
            self._patch(moe_utils, "te_general_gemm", None)
        self._patch(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host)
        from megatron.core.tensor_parallel import mappings

        self._patch(mappings, "_gather_along_first_dim", _uneven_gather(mappings._gather_along_first_dim))
        self._patch(mappings, "_reduce_scatter_along_first_dim",
                    _uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim))
        self._mode = CudaToCpuMode()
        self._mode.__enter__()
        logger.info("megatron-core %s CPU adaptor installed (gloo backend)", version)

    def uninstall(self) -> None:
        if not self.installed:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        for owner, name, value in reversed(self._saved):
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._saved.clear()


CPU_ADAPTOR = CpuAdaptor()
"""The process's one adaptor: patches are process-wide, so one object owns them."""
