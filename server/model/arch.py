"""Architecture description of a Llama-family model, read from an HF config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
"""Every projection a LoRA adapter may target, in layer order."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"
    """default, linear or llama3."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection in every layer."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]

    @staticmethod
    def module_path(layer: int, module: str) -> str:
        """HF name of a projection, e.g. model.layers.3.self_attn.q_proj."""
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        return f"model.layers.{layer}.{block}.{module}"

    @property
    def identity(self) -> dict:
        """What an adapter must agree with to fit this base."""
        return {"model_type": self.model_type, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size}


def _rope_from(cfg: dict) -> RopeConfig:
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older files write
    # rope_theta at the top level and rope_scaling for the scaled kinds.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelLoadError(f"config.json: rope type {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=theta, kind=kind, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                        cfg.get("max_position_embeddings", 8192))))


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    """The window transformers applies: Llama has none (it ignores a sliding_window key), Mistral applies
    it to every layer, Qwen2 only with use_sliding_window and only on its "sliding_attention" layers
    (layer_types, else the layers from max_window_layers on)."""
    if model_type == "llama" or not cfg.get("sliding_window"):
        return None
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None
        first = cfg.get("max_window_layers", 28)
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(int(cfg["num_hidden_layers"]))]
        if "sliding_attention" not in types:
            return None
        if any(t != "sliding_attention" for t in types):
            raise ModelLoadError("config.json: a sliding window on some layers only (qwen2 max_window_layers / "
                                 "layer_types) is not supported")
    return int(cfg["sliding_window"])


def arch_from_config(cfg: dict) -> ModelArch:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise ModelLoadError(f"config.json: missing {', '.join(missing)}")
    num_heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    sliding = _sliding_window(cfg, model_type)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("config.json: partial_rotary_factor != 1 is not supported")
    return ModelArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found (a model folder needs config.json)") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return arch_from_config(cfg)


def inverse_frequencies(arch: ModelArch):
    """RoPE inverse frequencies [head_dim / 2], fp32, as transformers computes them."""
    import torch

    rope, dim = arch.rope, arch.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq
