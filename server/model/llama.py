"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over flattened tokens.

Input is the step's tokens flattened to [T] (any mix of prefill chunks and decode tokens from many
sequences); a ForwardContext built once per step carries positions, paged-attention metadata, the
KV caches and the LoRA metadata. Names mirror transformers', so weights load by name and LoRA
targets map one to one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.meta import LoraBatchMeta
from .arch import ModelArch, inverse_frequencies
from .attention import AttentionMeta, paged_attention, write_kv
from .layers import AdaptedProjection, RMSNorm, apply_rotary, make_linear


@dataclass(slots=True)
class ForwardContext:
    attn: AttentionMeta
    cos: torch.Tensor
    """[T, head_dim]"""
    sin: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    lora: LoraBatchMeta | None
    lora_slots: object | None
    """The engine's LoraSlots (the stacks LoRA meta indexes); None when lora is None."""
    logits_indices: torch.Tensor
    """[N] int64: the tokens whose next-token logits are wanted (last token of each sampled sequence)."""
    lora_backend: str = "active"


class WeightSource(Protocol):
    """Where weights come from: `get(name)` returns a tensor on the target device in the compute dtype."""

    def get(self, name: str) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...


def _projection(source: WeightSource, prefix: str, module: str, bias: bool, quantization: str) -> AdaptedProjection:
    weight = source.get(f"{prefix}.{module}.weight")
    bias_tensor = source.get(f"{prefix}.{module}.bias") if bias else None
    return AdaptedProjection(make_linear(weight, bias_tensor, quantization), module)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, prefix: str, quantization: str, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.q_proj = _projection(source, prefix, "q_proj", arch.qkv_bias, quantization)
        self.k_proj = _projection(source, prefix, "k_proj", arch.qkv_bias, quantization)
        self.v_proj = _projection(source, prefix, "v_proj", arch.qkv_bias, quantization)
        self.o_proj = _projection(source, prefix, "o_proj", arch.o_bias, quantization)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x, ctx).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x, ctx).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, ctx).view(num_tokens, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.attn.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, ctx.attn, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim), ctx)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, prefix: str, quantization: str):
        super().__init__()
        self.gate_proj = _projection(source, prefix, "gate_proj", arch.mlp_bias, quantization)
        self.up_proj = _projection(source, prefix, "up_proj", arch.mlp_bias, quantization)
        self.down_proj = _projection(source, prefix, "down_proj", arch.mlp_bias, quantization)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, layer_idx: int, quantization: str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(source.get(f"{prefix}.input_layernorm.weight"), arch.rms_norm_eps)
        self.self_attn = Attention(arch, source, f"{prefix}.self_attn", quantization, layer_idx)
        self.post_attention_layernorm = RMSNorm(source.get(f"{prefix}.post_attention_layernorm.weight"),
                                                arch.rms_norm_eps)
        self.mlp = MLP(arch, source, f"{prefix}.mlp", quantization)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Decoder(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, quantization: str):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(source.get("model.embed_tokens.weight"), freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(arch, source, i, quantization) for i in range(arch.num_layers))
        self.norm = RMSNorm(source.get("model.norm.weight"), arch.rms_norm_eps)


class CausalLM(nn.Module):
    """The base model; its linears are dense or NF4, every projection carries LoRA slot stacks."""

    def __init__(self, arch: ModelArch, source: WeightSource, quantization: str, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.arch, self.dtype, self.device, self.quantization = arch, dtype, device, quantization
        self.model = Decoder(arch, source, quantization)
        if arch.tie_word_embeddings or not source.has("lm_head.weight"):
            self.lm_head_weight = self.model.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(source.get("lm_head.weight"), requires_grad=False)
        self.register_buffer("inv_freq", inverse_frequencies(arch).to(device), persistent=False)
        for index, (_, _, projection) in enumerate(self.projections()):
            projection.index = index

    def projections(self):
        """(layer index, module name, AdaptedProjection) for every adaptable linear."""
        for i, layer in enumerate(self.model.layers):
            for block in (layer.self_attn, layer.mlp):
                for name, module in block.named_children():
                    if isinstance(module, AdaptedProjection):
                        yield i, name, module

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] -> logits [N, vocab] (fp32) for ctx.logits_indices."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, ctx)
        x = self.model.norm(x[ctx.logits_indices])
        return F.linear(x, self.lm_head_weight).float()
