"""Metrics: the console line, a JSONL file in the save dir, TensorBoard, and the FLOP count behind MFU.

FLOPs are counted for the matrix multiplies of a forward pass over a sequence of
length s (2 FLOPs per multiply-add): per layer the QKV projection 2*s*h*(d_q + 2*d_kv),
attention scores and values 2*2*s^2*d_q halved for the causal mask, the output
projection 2*s*d_q*h and the MLP 2*s*h*f*(3 with SwiGLU, else 2); plus the LM head
2*a*h*V over the a positions it runs on (those with a target: the answer tokens). A DPO
step costs 3 forwards for the policy (forward + backward) and 1 for an online reference. MFU = achieved FLOP/s per device / the device's dense bf16 peak.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path


from engine.arguments import ModelConfig, MoEConfig
from engine.platform import accelerator_name

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                     "L40S": 362.0, "B200": 2250.0}


def detect_peak_tflops(override: float | None) -> float | None:
    """--peak-tflops, else the GPU's datasheet peak when its name is known; None on CPU."""
    if override is not None:
        return override
    name = accelerator_name()
    if name is None:
        return None
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), None)


def forward_flops(model: ModelConfig, padded_vocab_size: int, seq_length: int, output_positions: int | None = None,
                  moe: MoEConfig | None = None) -> float:
    """Matrix-multiply FLOPs of one forward pass over one sequence whose last projection runs on
    `output_positions` of its positions (all by default; formula in the module docstring);
    `padded_vocab_size` is the width of that projection (1 for a reward model's value head). With
    experts, a token's MLP work in an MoE layer is its top-k experts', the shared expert's and the router's
    (the active parameters), not a dense MLP of --ffn-hidden-size; dense layers (--moe-layer-freq) keep theirs."""
    s, h = seq_length, model.hidden_size
    d_q = model.num_attention_heads * model.kv_channels
    d_kv = model.num_query_groups * model.kv_channels
    mlp_matrices = 3 if model.swiglu else 2
    dense_width = model.ffn_hidden_size * mlp_matrices
    moe_layers = sum(moe.layer_pattern(model.num_layers)) if moe is not None else 0
    moe_width = 0 if not moe_layers else \
        (moe.moe_router_topk * moe.expert_ffn(model) + (moe.moe_shared_expert_intermediate_size or 0)) \
        * mlp_matrices + moe.num_experts
    attention = 2 * s * h * (d_q + 2 * d_kv) + 2 * s * s * d_q + 2 * s * d_q * h
    mlp = 2 * s * h * ((model.num_layers - moe_layers) * dense_width + moe_layers * moe_width)
    outputs = s if output_positions is None else output_positions
    return model.num_layers * attention + mlp + 2 * outputs * h * padded_vocab_size


class MetricsLogger:
    """Writes each logged step to the console, `SAVE/metrics.jsonl` and TensorBoard (global rank 0 only)."""

    def __init__(self, save_dir: str | None, tensorboard_dir: str | None, enabled: bool, start_iteration: int = 0):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        if not enabled:
            return
        if save_dir is not None:
            path = Path(save_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_rows_after(path, start_iteration)
            self.jsonl = open(path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, iteration: int, scalars: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        line = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items())
        logger.info("[%s] iteration %d | %s", split, iteration, line)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": split, "iteration": iteration, **scalars}) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{split}/{key}", value, iteration)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _drop_rows_after(path: Path, iteration: int) -> None:
    """A run that stopped after its last checkpoint logged steps that a resume repeats: drop them."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    if len(kept) != len(lines):
        logger.info("%s: dropped %d rows after iteration %d (logged after the last checkpoint)",
                    path, len(lines) - len(kept), iteration)
        path.write_text("".join(kept), encoding="utf-8")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
