import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

# Two cores on CI: keep each test single-threaded so timings stay predictable.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))


@pytest.fixture
def coco_sample():
    root = SHARED / "data" / "coco_stuff_sample"
    if not root.is_dir():
        pytest.skip(f"{root} not found (the shared sample data lives beside the checkout)")
    return root
