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

from ..attention.meta import AttentionStepMeta
from ..attention.ops import paged_attention, write_kv
from ..lora.stacks import GROUP_SLICES, LoraStacks, ProjectionGroupShape
from ..lora.step_meta import LoraStepMeta
from .arch import ModelArch, inverse_frequencies
from .fused import rotary_qk
from .layers import ProjectionGroup, RMSNorm, make_linear


@dataclass(slots=True)
class ForwardContext:
    attn: AttentionStepMeta
    cos: torch.Tensor
    """[T, head_dim]"""
    sin: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    lora: LoraStepMeta | None
    lora_stacks: LoraStacks | None
    """The engine's LoRA pools (what the LoRA meta's slots index); None when lora is None."""
    logits_indices: torch.Tensor
    """[N] int64: the tokens whose next-token logits are wanted (last token of each sampled sequence)."""


class WeightSource(Protocol):
    """Where weights come from: `get(name)` returns a tensor on the target device in the compute dtype."""

    def get(self, name: str) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...


def _group(source: WeightSource, prefix: str, layer: int, name: str, bias: bool, quantization: str) -> ProjectionGroup:
    slices = GROUP_SLICES[name]
    weights = [source.get(f"{prefix}.{module}.weight") for module in slices]
    biases = [source.get(f"{prefix}.{module}.bias") for module in slices] if bias else None
    return ProjectionGroup(make_linear(weights, biases, quantization), layer, name, slices)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, prefix: str, quantization: str, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.sliding_window = arch.sliding_window
        self.qkv_proj = _group(source, prefix, layer_idx, "qkv", arch.qkv_bias, quantization)
        self.o_proj = _group(source, prefix, layer_idx, "o", arch.o_bias, quantization)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, ctx)
        q, k = rotary_qk(qkv, self.num_heads, self.num_kv_heads, self.head_dim, ctx.cos, ctx.sin)
        v_start = (self.num_heads + self.num_kv_heads) * self.head_dim
        v = qkv[:, v_start:v_start + self.num_kv_heads * self.head_dim].view(num_tokens, self.num_kv_heads,
                                                                             self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.attn.kv_index)
        out = paged_attention(q, k_cache, v_cache, ctx.attn, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim), ctx)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, prefix: str, quantization: str, layer_idx: int):
        super().__init__()
        self.gate_up_proj = _group(source, prefix, layer_idx, "gate_up", arch.mlp_bias, quantization)
        self.down_proj = _group(source, prefix, layer_idx, "down", arch.mlp_bias, quantization)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_gate_up_silu(x, ctx), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, source: WeightSource, layer_idx: int, quantization: str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(source.get(f"{prefix}.input_layernorm.weight"), arch.rms_norm_eps)
        self.self_attn = Attention(arch, source, f"{prefix}.self_attn", quantization, layer_idx)
        self.post_attention_layernorm = RMSNorm(source.get(f"{prefix}.post_attention_layernorm.weight"),
                                                arch.rms_norm_eps)
        self.mlp = MLP(arch, source, f"{prefix}.mlp", quantization, layer_idx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, x = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), ctx))
        return x + self.mlp(h, ctx)


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

    def projection_groups(self):
        """Every fused projection group (qkv, o, gate_up, down of each layer), in model order."""
        for layer in self.model.layers:
            yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)

    def group_shapes(self) -> list[ProjectionGroupShape]:
        """What the LoRA pools must hold for this model."""
        return [ProjectionGroupShape(g.layer, g.name, g.slices, g.in_features, g.slice_features)
                for g in self.projection_groups()]

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """One projection's weight [out, in] in the compute dtype (NF4: dequantized, bit-identical to bnb)."""
        for group in self.projection_groups():
            if group.layer == layer and module in group.slices:
                return group.base.dequantized_weight(group.slices.index(module))
        raise KeyError(f"no projection {module!r} in layer {layer}")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] -> logits [N, vocab] (fp32) for ctx.logits_indices."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, ctx)
        x = self.model.norm(x[ctx.logits_indices])
        return F.linear(x, self.lm_head_weight).float()
