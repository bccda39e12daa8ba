"""Checkpoint conversion time and peak memory on a ~1.1B-parameter random Llama (TinyLlama shape, bf16).

    python benchmarks/bench_convert.py [--work-dir /tmp/bench_convert] [--keep]

The HF model is written directly as safetensors shards (no transformers model is built).
Each conversion runs in its own process, which reports its wall time and peak RSS
(ru_maxrss) and peak anonymous RSS. The last step
checks that hf -> mg -> mg (reshard) -> hf reproduces every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_random_hf_model(path: Path, shard_bytes: int = 2 * 10**9) -> int:
    """config.json + bf16 safetensors shards with an index; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(**SHAPE, dtype="bfloat16").save_pretrained(path)
    h, f, v, heads, groups = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                  "num_attention_heads", "num_key_value_heads"))
    d = h // heads
    names = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                      p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (groups * d, h),
                      p + "self_attn.v_proj.weight": (groups * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                      p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                      p + "mlp.down_proj.weight": (h, f)})
    generator = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in names.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current[name] = tensor
        size += tensor.numel() * 2
        total += tensor.numel()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(config_json: str) -> None:
    """Runs one conversion and prints wall time, peak RSS and peak anonymous RSS as JSON.

    Anonymous RSS (sampled every 20 ms) is the memory the converter itself holds; total RSS
    also counts the clean file pages of the memory-mapped inputs, which the kernel can drop.
    """
    import threading

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _rss_anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    run_conversion(ConvertConfig(**json.loads(config_json)))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "peak_anon_bytes": peak_anon[0]}))


def measure(label: str, **config) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{label} failed:\n{result.stderr}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"| {label} | {figures['seconds']:.1f} | {figures['peak_rss_bytes'] / 2**30:.2f} | "
          f"{figures['peak_anon_bytes'] / 2**30:.2f} |", flush=True)
    return figures


def check_bit_exact(a: Path, b: Path) -> int:
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, str]:
        return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    left, right = index(a), index(b)
    assert left.keys() == right.keys(), "tensor names differ"
    for name, file in left.items():
        with safe_open(a / file, "pt") as x, safe_open(b / right[name], "pt") as y:
            s, t = x.get_tensor(name), y.get_tensor(name)
            assert s.dtype == t.dtype and s.equal(t), name
    return len(left)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="/tmp/bench_convert")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "hf").mkdir(parents=True)
    start = time.perf_counter()
    params = write_random_hf_model(work / "hf")
    size = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
    print(f"random model: {params / 1e9:.2f}B params, {size / 2**30:.2f} GiB bf16, "
          f"written in {time.perf_counter() - start:.0f} s\n")
    print("| conversion | time (s) | peak RSS (GiB) | peak anonymous RSS (GiB) |\n|---|---|---|---|")
    common = dict(max_shard_size=2 * 10**9)
    measure("hf -> mg TP1 PP1", load_model_type="hf", save_model_type="mg", load_dir=str(work / "hf"),
            save_dir=str(work / "mg_tp1pp1"), **common)
    measure("hf -> mg TP2 PP2", load_model_type="hf", save_model_type="mg", load_dir=str(work / "hf"),
            save_dir=str(work / "mg_tp2pp2"), target_tensor_parallel_size=2, target_pipeline_parallel_size=2,
            **common)
    measure("mg -> mg TP2 PP2 -> TP4 PP2 (10,12)", load_model_type="mg", save_model_type="mg",
            load_dir=str(work / "mg_tp2pp2"), save_dir=str(work / "mg_resharded"), target_tensor_parallel_size=4,
            target_pipeline_parallel_size=2, num_layer_list=[10, 12], **common)
    measure("mg -> hf from TP4 PP2", load_model_type="mg", save_model_type="hf", load_dir=str(work / "mg_resharded"),
            save_dir=str(work / "hf_out"), **common)
    measure("mg -> hf from TP1 PP1", load_model_type="mg", save_model_type="hf", load_dir=str(work / "mg_tp1pp1"),
            save_dir=str(work / "hf_out_pp1"), **common)
    count = check_bit_exact(work / "hf", work / "hf_out")
    print(f"\nround trip hf -> mg TP2PP2 -> mg TP4PP2 -> hf: all {count} tensors bit-exact")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
