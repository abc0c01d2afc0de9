"""Shared pytest setup: import the package from the repo root and never touch the Hugging Face hub."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Offline before anything imports huggingface_hub / transformers / datasets: no 20-40 s retry loops.
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_key] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use small tensors: one intra-op thread avoids OpenMP wake-ups, which dominate on a busy 2-core machine
    (measured: 10x slower tiny training steps with 2 threads under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
