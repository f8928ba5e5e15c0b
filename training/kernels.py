"""Liger Kernel's fused Triton ops for training: RMSNorm, SwiGLU (silu(gate) * up) and RoPE on the model,
and fused linear + cross-entropy in our loss (training/loss.py): fewer kernels, no fp32 activations kept.

`liger`: "on" needs CUDA, Triton and the liger-kernel package; "auto" turns it on when all three are
there. Each op is checked against the model's own on a GPU (tests/training/test_kernels_gpu.py); the
bench toggles it (`--liger on|off`) to measure what it pays.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator

import torch

from loraplex.server.errors import ConfigError

from .config import LIGER_SETTINGS

LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PATCHED_MODULES = tuple(f"transformers.models.{t}.modeling_{t}" for t in LIGER_MODEL_TYPES)


def liger_missing(cuda: bool) -> str | None:
    """Why Liger cannot run here, or None."""
    if not cuda:
        return "Liger Kernel needs a CUDA device (its ops are Triton kernels)"
    for package in ("triton", "liger_kernel"):
        if importlib.util.find_spec(package) is None:
            return f"Liger Kernel needs the {package.replace('_', '-')} package (pip install liger-kernel)"
    return None


def resolve_liger(setting: str, cuda: bool, model_type: str | None = None) -> bool:
    assert setting in LIGER_SETTINGS, setting
    problem = liger_missing(cuda)
    if problem is None and model_type is not None and model_type not in LIGER_MODEL_TYPES:
        problem = f"Liger Kernel is wired here for {', '.join(LIGER_MODEL_TYPES)}, not {model_type}"
    if setting == "on" and problem:
        raise ConfigError(f"liger='on': {problem}")
    return setting != "off" and problem is None


def apply_liger(model) -> None:
    """RMSNorm, SwiGLU and RoPE of a loaded (PEFT-wrapped or not) Llama-family model, in place. The loss stays
    ours (training/loss.py uses Liger's fused linear + cross-entropy itself), so the model's forward is kept."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_n CE(hidden[n] @ weight.T, targets[n]) without the [N, vocab] logits. hidden: [N, H], weight: [V, H]."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight.to(hidden.dtype), targets, reduction="sum")


@contextlib.contextmanager
def restored_modeling_modules() -> Iterator[None]:
    """Liger also patches transformers' modeling modules (RoPE function, norm and MLP classes) for models built
    later; a bench that builds a peer's model afterwards in the same process gets them back unpatched."""
    saved = {}
    for name in _PATCHED_MODULES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            saved[module] = dict(vars(module))
    try:
        yield
    finally:
        for module, attributes in saved.items():
            for key, value in attributes.items():
                if vars(module).get(key) is not value:
                    setattr(module, key, value)
