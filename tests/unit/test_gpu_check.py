"""What of the GPU path can be checked on CPU: scripts/gpu_check.sh's checks and plan, the benchmark's 1.1B
preset, and the dependency pins per Python version in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=120)


def test_script_parses_and_is_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    assert _gpu_check("--bogus").returncode == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_dry_run_without_cuda_prints_the_plan_and_refuses():
    result = _gpu_check("--dry-run")
    assert result.returncode == 2
    assert "gpu_check.sh: error: torch is a CPU build: install a CUDA build of torch" in result.stderr
    assert "-m pytest -q -m cuda tests/cuda" in result.stdout
    assert "benchmarks/bench_dpo.py --shape llama-1.1b --device cuda --output" in result.stdout
    assert ("--device cuda --data-shape long-prompt --max-answer 500 --modes precomputed_packed "
            "precomputed_packed_shared") in result.stdout
    assert "megatron.core ok" in result.stdout and "transformer-engine no" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_missing_megatron_core_is_installed_from_the_wheel_dir_or_explained(tmp_path):
    shadow = tmp_path / "shadow" / "megatron"  # a megatron package that does not import
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    hidden = {"PYTHONPATH": str(tmp_path / "shadow")}
    result = _gpu_check("--dry-run", **hidden)
    assert result.returncode == 2 and "megatron-core does not import: pip install" in result.stderr
    wheels = _gpu_check("--dry-run", MCORE_WHEEL_DIR=str(tmp_path), **hidden)
    assert f"megatron-core does not import: would install it from MCORE_WHEEL_DIR={tmp_path}" in wheels.stdout
    assert "megatron-core does not import: pip install" not in wheels.stderr


def test_benchmark_preset_is_a_1_1b_llama_in_bf16_at_2048():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_dpo
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    args = bench_dpo.parse_args(["--shape", "llama-1.1b"])
    assert (args.hidden_size, args.num_layers, args.num_heads, args.num_query_groups) == (2048, 22, 32, 4)
    assert (args.ffn_hidden_size, args.vocab_size, args.seq_length, args.bf16) == (5632, 32000, 2048, True)
    assert args.max_answer + 32 <= args.seq_length  # the longest prompt + answer fits: no truncation
    assert bench_dpo.parse_args(["--shape", "llama-1.1b", "--iters", "3"]).iters == 3  # explicit flags win
    assert bench_dpo.parse_args([]).hidden_size == 256  # no preset: the CPU defaults
    long = bench_dpo.parse_args(["--shape", "llama-1.1b", "--data-shape", "long-prompt", "--max-answer", "500"])
    assert 3 * long.max_answer + long.max_answer <= long.seq_length  # gpu_check.sh's long prompts: no truncation
    with pytest.raises(SystemExit):  # the preset's answers with long prompts would be cut: refused
        bench_dpo.parse_args(["--shape", "llama-1.1b", "--data-shape", "long-prompt"])
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(bench_dpo.llama_config(args))
    assert 1.09e9 < sum(p.numel() for p in model.parameters()) < 1.11e9


def test_pins_keep_python_3_11_on_the_tested_versions_and_allow_the_newest_on_3_12():
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [Requirement(r) for r in pyproject["project"]["dependencies"]]

    def allowed(name: str, python: str, version: str) -> bool:
        rules = [r for r in requirements if r.name == name and (r.marker is None or r.marker.evaluate(
            {"python_version": python, "python_full_version": python + ".0"}))]
        assert len(rules) == 1, (name, python, rules)
        return rules[0].specifier.contains(version)

    assert allowed("megatron-core", "3.11", "0.16.1") and not allowed("megatron-core", "3.11", "0.19.2")
    assert allowed("megatron-core", "3.12", "0.19.2") and not allowed("megatron-core", "3.12", "0.20.0")
    assert allowed("torch", "3.11", "2.13.0") and allowed("torch", "3.12", "2.15.0")
    import megatron.core

    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert allowed("megatron-core", running, megatron.core.__version__)
    assert allowed("torch", running, torch.__version__.split("+")[0])
    assert any(m.startswith("cuda:") for m in pyproject["tool"]["pytest"]["ini_options"]["markers"])
