"""The CPU adaptor: one test per bridged megatron-core call site (engine.platform.CPU_ADAPTOR_SITES)."""

from __future__ import annotations

import os

import megatron.core
import pytest
import torch

from engine.platform import (
    CPU_ADAPTOR,
    DETERMINISTIC_ENV,
    Platform,
    current_device,
    detect_platform,
    enable_deterministic_mode,
    unchecked_version_message,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the adaptor is for machines without CUDA")


@pytest.fixture
def adaptor():
    CPU_ADAPTOR.install()
    yield CPU_ADAPTOR
    CPU_ADAPTOR.uninstall()


def test_detect_platform_picks_cpu_gloo_and_rejects_nccl_without_gpu():
    platform = detect_platform()
    assert (platform.device_type, platform.backend) == ("cpu", "gloo")
    assert current_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="--distributed-backend nccl needs CUDA"):
        detect_platform("nccl")


def test_current_device_and_synchronize(adaptor):
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.cuda.synchronize() is None


def test_cuda_factories_and_moves_land_on_cpu(adaptor):
    assert torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda().device.type == "cpu"
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda").device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # non-device .to untouched


def test_tensor_type_reports_cuda_names(adaptor):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_cuda_rng_calls_drive_the_cpu_generator(adaptor):
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_megatron_rng_tracker_forks_a_separate_cpu_stream(adaptor):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(1)
    expected_outside = torch.rand(4, generator=torch.Generator().manual_seed(1))
    with tracker.fork("model-parallel-rng"):
        inside = torch.rand(4)
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(4), expected_outside)  # the default stream did not advance
    with tracker.fork("model-parallel-rng"):
        assert not torch.equal(torch.rand(4), inside)  # the forked stream continues


def test_grad_scaler_and_clip_grads_run_on_cpu(adaptor):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = DynamicGradScaler(initial_scale=2.0**8, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=1, hysteresis=1)
    assert scaler.scale.device.type == "cpu"
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5)


def test_rotary_embedding_builds_on_cpu(adaptor):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    assert rope.inv_freq.device.type == "cpu"
    assert rope(6).shape == (6, 1, 1, 8)


def test_install_is_idempotent_and_uninstall_restores():
    original = torch.cuda.current_device
    CPU_ADAPTOR.install()
    CPU_ADAPTOR.install()
    assert CPU_ADAPTOR.installed and torch.cuda.current_device is not original
    CPU_ADAPTOR.uninstall()
    assert not CPU_ADAPTOR.installed and torch.cuda.current_device is original
    from megatron.core.transformer.moe import moe_utils

    assert not hasattr(moe_utils, "te_general_gemm")  # the name it lacked is removed again
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_install_refuses_unchecked_megatron_versions_and_says_which_way(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.19.2")
    with pytest.raises(RuntimeError, match=r"0.19.2 is newer than the versions the CPU adaptor was checked against "
                                           r"\(0.15.x, 0.16.x\).*Python 3.11 and megatron-core 0.16.1"):
        CPU_ADAPTOR.install()
    assert not CPU_ADAPTOR.installed
    assert "is older than" in unchecked_version_message("0.14.0")
    assert unchecked_version_message("0.16.1") is None and unchecked_version_message("0.15.3") is None


# -- CUDA machines, with torch.cuda monkeypatched (no GPU needed) ---------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """A node with two visible GPUs; records set_device calls."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_cuda_pairs_with_nccl_and_refuses_gloo(gpus):
    assert detect_platform() == Platform("cuda", "nccl") == detect_platform("nccl")
    with pytest.raises(ValueError, match="--distributed-backend gloo on a machine with CUDA.*use nccl"):
        detect_platform("gloo")


def test_each_local_rank_gets_its_own_gpu(gpus):
    platform = Platform("cuda", "nccl")
    platform.bind_local_device(1, 2)
    assert gpus == [1]
    with pytest.raises(RuntimeError, match=r"4 ranks on this node \(torchrun --nproc-per-node\), but only 2 GPU"):
        platform.bind_local_device(3, 4)
    with pytest.raises(RuntimeError, match="3 ranks on this node"):
        platform.bind_local_device(2, 1)  # a LOCAL_RANK past the GPUs, whatever LOCAL_WORLD_SIZE says
    assert gpus == [1]  # no rank was stacked onto a GPU modulo the count
    Platform("cpu", "gloo").bind_local_device(5, 8)  # CPU: nothing to bind


def test_the_memory_peak_restarts_on_cuda_and_is_the_process_peak_on_cpu(gpus, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    cuda = Platform("cuda", "nccl")
    cuda.reset_peak_memory()
    assert calls == ["reset"] and cuda.peak_memory_bytes() == 5 * 2**30
    cpu = Platform("cpu", "gloo")
    before = cpu.peak_memory_bytes()
    cpu.reset_peak_memory()
    assert calls == ["reset"] and cpu.peak_memory_bytes() >= before > 0  # the peak RSS cannot go down


def test_initialize_refuses_more_ranks_than_gpus_before_joining_the_group(gpus, monkeypatch):
    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match="3 ranks on this node"):
        initialize_distributed(ParallelConfig())
    assert not torch.distributed.is_initialized()


# -- --deterministic-mode -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    """No determinism variable set by the launcher; torch's global switch recorded instead of flipped."""
    for name in DETERMINISTIC_ENV:
        monkeypatch.setenv(name, "unset")  # so that teardown restores the variable's absence
        monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kwargs: calls.append(mode))
    return calls


def test_deterministic_mode_sets_what_megatron_lm_sets(clean_env, monkeypatch):
    enable_deterministic_mode()
    assert {name: os.environ[name] for name in DETERMINISTIC_ENV} == {
        "NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
    assert clean_env == [True]
    # A deterministic choice of the launcher's is kept; a nondeterministic one is refused, naming the flag.
    monkeypatch.setenv("NCCL_ALGO", "CollnetDirect,CollnetChain")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    enable_deterministic_mode()
    assert os.environ["NCCL_ALGO"] == "CollnetDirect,CollnetChain" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    with pytest.raises(ValueError) as err:
        enable_deterministic_mode()
    assert str(err.value) == ("--deterministic-mode: NCCL_ALGO=Tree is not deterministic; unset it or use "
                              "CollnetChain or CollnetDirect or Ring or ^NVLS")
    assert clean_env == [True, True]


def test_initialize_applies_deterministic_mode_before_the_first_cuda_call(gpus, clean_env, monkeypatch):
    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: clean_env.append(f"set_device {device}"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # refused at the first CUDA call, before joining a group
    with pytest.raises(RuntimeError, match="3 ranks on this node"):
        initialize_distributed(ParallelConfig(), deterministic_mode=True)
    assert clean_env == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(RuntimeError, match="3 ranks on this node"):
        initialize_distributed(ParallelConfig())  # the default leaves torch and the environment alone
    assert clean_env == [True] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_allocation_with_current_device_inside_autograd_backward(adaptor):
    # megatron's sequence-parallel linear allocates like this in backward, outside the function mode.
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            out = torch.empty(grad.shape, dtype=grad.dtype, device=torch.cuda.current_device())
            return out.copy_(2 * grad)

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_cuda_streams_and_events_are_in_order_stand_ins(adaptor):
    # MoEAlltoAllTokenDispatcher: a device-to-host stream, a wait, a recorded event synchronized later.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
    stream = torch.cuda.Stream()
    assert torch.cuda.current_stream() != stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        value = torch.ones(2) * 3
    event = stream.record_event()
    assert event.synchronize() is None and event.query()
    assert value.tolist() == [3.0, 3.0]


def test_router_gating_linear_runs_without_transformer_engine(adaptor):
    # megatron-core 0.16.1 reads moe_utils.te_general_gemm, which it defines only when TE imports.
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    inp = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    out = router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(out, inp @ weight.t())
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 4).t() @ inp.detach())


def test_dispatcher_split_sizes_reach_all_to_all_as_host_integers(adaptor):
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert not torch.is_tensor(splits) and splits.tolist() == [3, 1]
    counts = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([2, 2]))
    assert torch.is_tensor(counts)


def _uneven_gather_and_scatter(sizes):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from engine.platform import CPU_ADAPTOR

    CPU_ADAPTOR.install()
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    mine = torch.full((sizes[rank], 2), float(rank + 1))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    scattered = mappings._reduce_scatter_along_first_dim(gathered * (rank + 1), group, input_split_sizes=sizes)
    return gathered, scattered


def test_uneven_gather_and_reduce_scatter_over_gloo():
    # The alltoall dispatcher's TP all-gather of a variable number of tokens per rank, and its backward.
    from tests.distributed.harness import run_ranks

    sizes = [3, 1]
    (g0, s0), (g1, s1) = run_ranks(_uneven_gather_and_scatter, 2, sizes)
    expected = torch.cat([torch.full((3, 2), 1.0), torch.full((1, 2), 2.0)])
    assert torch.equal(g0, expected) and torch.equal(g1, expected)
    # Rank r keeps its own rows of the sum over ranks of (gathered x (rank + 1)): 3 x its rows.
    assert torch.equal(s0, 3 * expected[:3]) and torch.equal(s1, 3 * expected[3:])
