"""--shared-prompt attention alone: forward + backward time of one layer's core attention over a row of pairs
([prompt | chosen | rejected] each), per way of computing the rejected part, on CPU or CUDA.

    bool_mask     per pair: prompt + chosen causal, rejected over [prompt; rejected] with a [R, P + R] boolean mask
                  (the CPU path; on CUDA a boolean mask keeps SDPA off its flash kernel)
    causal_bias   per pair, the rejected part with torch's lower-right CausalBias (the CUDA fallback: fp32, dropout)
    padded_batch  every segment padded to the longest, one SDPA call with a [segments, Lq, Lk] mask
    engine        SDPAttention as the engine runs it on this device (on CUDA in fp16/bf16: one flash varlen call)

Each way's output is checked against bool_mask's. Prints milliseconds per call (best of --repeats).

    python benchmarks/bench_shared_attention.py                             # CPU, fp32
    python benchmarks/bench_shared_attention.py --device cuda --dtype bf16  # one GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name -> pairs (prompt, chosen, rejected) of one packed row
    "long-prompt": [(600, 150, 150), (300, 100, 80), (400, 60, 90)],
    "short-prompt": [(20, 100, 60), (30, 40, 120), (10, 150, 50), (25, 30, 30)],
}


def per_pair(q, k, v, pairs, scale, rejected_mask):
    out, start = [], 0
    for prefix, chosen, rejected in pairs:
        split, end = start + prefix + chosen, start + prefix + chosen + rejected

        def attend(q, k, v, **kw):
            seg = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*seg, scale=scale, enable_gqa=True, **kw)[0].transpose(0, 1)

        out.append(attend(q[start:split], k[start:split], v[start:split], is_causal=True))
        keys = torch.cat([torch.arange(start, start + prefix), torch.arange(split, end)]).to(q.device)
        out.append(attend(q[split:end], k[keys], v[keys], attn_mask=rejected_mask(rejected, prefix, q.device)))
        start = end
    return torch.cat(out)


def bool_mask(q, k, v, pairs, scale):
    return per_pair(q, k, v, pairs, scale,
                    lambda r, p, device: torch.ones(r, p + r, dtype=torch.bool, device=device).tril_(p))


def causal_bias(q, k, v, pairs, scale):
    if k.shape[1] != q.shape[1]:  # the memory-efficient kernel takes no GQA (as in engine/model/attention.py)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return per_pair(q, k, v, pairs, scale, lambda r, p, device: causal_lower_right(r, p + r))


def padded_batch(q, k, v, pairs, scale):
    queries, keys, start = [], [], 0
    for prefix, chosen, rejected in pairs:
        split, end = start + prefix + chosen, start + prefix + chosen + rejected
        queries += [torch.arange(start, split), torch.arange(split, end)]
        keys += [torch.arange(start, split), torch.cat([torch.arange(start, start + prefix), torch.arange(split, end)])]
        start = end
    n, lq, lk = len(queries), max(map(len, queries)), max(map(len, keys))
    qi, ki = torch.zeros(n, lq, dtype=torch.long), torch.zeros(n, lk, dtype=torch.long)
    mask = torch.zeros(n, 1, lq, lk, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(queries, keys)):
        qi[i, :len(a)], ki[i, :len(b)] = a, b
        mask[i, 0, :len(a), :len(b)] = torch.ones(len(a), len(b), dtype=torch.bool).tril_(len(b) - len(a))
        mask[i, 0, len(a):, 0] = True  # padding queries see one key: no empty softmax
    qi, ki, mask = qi.to(q.device), ki.to(q.device), mask.to(q.device)
    out = F.scaled_dot_product_attention(q[qi].transpose(1, 2), k[ki].transpose(1, 2), v[ki].transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    return torch.cat([out[i, :len(a)] for i, a in enumerate(queries)])


def engine_path(heads, groups, head_dim):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from engine.model.attention import HostPackedSeqParams, SDPAttention

    core = SDPAttention(TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                                          num_query_groups=groups, attention_dropout=0.0),
                        1, AttnMaskType.causal, "self")

    def run(q, k, v, pairs, scale):
        params = HostPackedSeqParams(qkv_format="thd", seq_lengths=tuple(map(sum, pairs)), pair_layouts=tuple(pairs))
        return core(q, k, v, None, packed_seq_params=params).unflatten(1, (heads, head_dim))

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    scale = args.head_dim ** -0.5
    ways = {"bool_mask": bool_mask, "causal_bias": causal_bias, "padded_batch": padded_batch,
            "engine": engine_path(args.heads, args.groups, args.head_dim)}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"{args.device} {args.dtype}, {args.heads} heads ({args.groups} KV) x {args.head_dim}, "
          f"{torch.get_num_threads()} threads; ms per forward + backward (best of {args.repeats})")
    for shape, pairs in SHAPES.items():
        tokens = sum(map(sum, pairs))
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(tokens, h, args.head_dim, generator=g) for h in (args.heads, args.groups, args.groups)]
        reference, row = None, []
        for name, way in ways.items():
            q, k, v = (t.to(args.device, dtype).requires_grad_() for t in base)
            best = float("inf")
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                out = way(q, k, v, pairs, scale)
                out.float().sum().backward()
                sync()
                best = min(best, time.perf_counter() - start)
            out = out.detach().float().cpu()
            reference = out if reference is None else reference
            row.append(f"{name} {best * 1e3:.2f} (diff {(out - reference).abs().max().item():.0e})")
        print(f"{shape:<13} {tokens} tokens: " + " | ".join(row))


if __name__ == "__main__":
    main()
