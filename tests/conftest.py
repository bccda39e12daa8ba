"""Session settings shared by every test."""

import torch

# One intra-op thread in the test process, as in every rank the harness starts: the models are tiny, and
# two OpenMP threads spinning on 2 cores that rank processes also use slow a forward down up to ~90x
# (0.45 s instead of 5 ms for a 4-layer HF Llama at load 4).
torch.set_num_threads(1)
