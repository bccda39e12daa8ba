"""The GPU tier: every test under tests/cuda/ is marked `cuda` and skipped where CUDA is absent, so CPU CI
collects it and moves on. scripts/gpu_check.sh runs it with `pytest -m cuda tests/cuda`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs this tier)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)
