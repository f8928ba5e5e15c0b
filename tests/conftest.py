"""Shared fixtures: the embedded model (converted once, cached), on CPU, loaded once per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from loraplex.server.config import ModelConfig
from loraplex.server.model.embedded import embedded_model_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """cuda under `pytest -m gpu` on a GPU machine, else cpu."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("LORAPLEX_TEST_DEVICE", "") != "cpu" else "cpu"


@pytest.fixture(scope="session")
def embedded_dir():
    """HF folder (safetensors, fp32) of the embedded SmolLM2-135M-Instruct."""
    return embedded_model_dir()


@pytest.fixture(scope="session")
def smol_fp32(embedded_dir):
    """Our model on the CPU in fp32 (shared: tests must not mutate its LoRA slots without restoring)."""
    from loraplex.server.model.loader import load_model

    return load_model(ModelConfig(path=str(embedded_dir), quantization="none", dtype="float32"))


@pytest.fixture(scope="session")
def hf_smol_fp32(embedded_dir):
    """transformers' reference model on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    return model.eval()
