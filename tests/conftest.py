from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("IMAGEGEN_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_models(root)
    return root
