"""Shared test setup: offline, a private cache root, seeded RNGs, and the repository on sys.path."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # tests also run from outside the repository root
    sys.path.insert(0, str(REPO_ROOT))

# No network here, and tests must never need it: make the Hugging Face libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_root(tmp_path_factory: pytest.TempPathFactory):
    """Point BLIP2_CACHE_ROOT at a per-session temp dir so tests never read or write ~/.cache/blip2."""
    old = os.environ.get("BLIP2_CACHE_ROOT")
    os.environ["BLIP2_CACHE_ROOT"] = str(tmp_path_factory.mktemp("blip2_cache"))
    yield
    if old is None:
        os.environ.pop("BLIP2_CACHE_ROOT", None)
    else:
        os.environ["BLIP2_CACHE_ROOT"] = old


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state (python, numpy, torch)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped (with a reason) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
