"""An export-friendly view of our CausalLM: padded [batch, seq] tensors and an explicit KV cache.

The serving model works on flattened tokens and paged KV blocks (data-dependent gathers that ONNX and
TensorRT handle badly). This module runs the same weights (the CausalLM's own RMSNorm, linears and
rotary frequencies) over plain tensors, in the input/output layout optimum and onnxruntime-genai use:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (1 = real token),
             position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] (model dtype), i < layers
    outputs  logits [batch, seq, vocab] fp32,
             present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Linear weights are held transposed ([in, out], named after the HF weight they come from, e.g.
`layers.0.self_attn.q_proj.weight_t`), so the exported MatMuls read named initializers: the int4
quantizer then names its tensors after them and validate.py can map the 4-bit weights back.
Building the decoder takes the CausalLM's projections over (their dense weights are released).

Attention matches transformers' eager path (scores in the model dtype, softmax in fp32); a query at
cache index past + s sees keys j <= past + s whose mask is 1 (and, with a sliding window, within it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.server.model.layers import ProjectionGroup
from loraplex.server.model.llama import CausalLM

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True, slots=True)
class DecoderIO:
    """Names of the decoder's graph inputs and outputs, in order."""

    num_layers: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return [*INPUT_NAMES, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos, sin: [B, 1, S, D]; rotate-half (HF Llama)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias, weight_t: [in, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class ExportDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present); see the module doc."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.arch, self.dtype, self.device = model.arch, model.dtype, model.device
        self.io = DecoderIO(model.arch.num_layers)
        self.embed_tokens = model.model.embed_tokens
        self.norm = model.model.norm
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.layers = nn.ModuleList()
        for layer in model.model.layers:
            block = nn.Module()
            block.input_layernorm, block.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
            block.self_attn, block.mlp = nn.Module(), nn.Module()
            block.self_attn.scale = layer.self_attn.scale
            for parent, source in ((block.self_attn, layer.self_attn), (block.mlp, layer.mlp)):
                for group in [child for child in source.children() if isinstance(child, ProjectionGroup)]:
                    dense = group.base  # fused slices (q|k|v, gate|up): one named MatMul per projection again
                    biases = (None,) * len(group.slices) if dense.bias is None else \
                        dense.bias.data.split(group.slice_features)
                    for index, (name, bias) in enumerate(zip(group.slices, biases)):
                        setattr(parent, name, TransposedLinear(dense.dequantized_weight(index).data, bias))
                    group.base = None  # release the untransposed copy
            self.layers.append(block)
        self.lm_head = TransposedLinear(model.lm_head_weight.data, None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor):
        dtype = self.dtype
        x = self.embed_tokens(input_ids)  # [B, S, H]
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        bias = self._attention_bias(attention_mask, input_ids.shape[1])  # [B, 1, S, past + S] fp32
        presents = []
        for i, layer in enumerate(self.layers):
            past_k, past_v = past_key_values[2 * i], past_key_values[2 * i + 1]
            h, k, v = self._attention(layer, layer.input_layernorm(x), cos, sin, bias, past_k, past_v)
            presents += [k, v]
            x = x + h
            mlp = layer.mlp
            y = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(y)) * mlp.up_proj(y))
        logits = self.lm_head(self.norm(x)).float()
        return (logits, *presents)

    def _attention_bias(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """0 where a query may attend a key, the fp32 minimum elsewhere (never -inf: fully padded rows stay finite)."""
        total = attention_mask.shape[1]
        key_index = torch.arange(total, device=attention_mask.device)
        query_index = torch.arange(seq, device=attention_mask.device) + (total - seq)
        allowed = key_index[None, :] <= query_index[:, None]  # [S, T]
        window = self.arch.sliding_window
        if window is not None:
            allowed = allowed & (query_index[:, None] - key_index[None, :] < window)
        allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)  # [B, 1, S, T]
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)

    def _attention(self, layer, x, cos, sin, bias, past_k, past_v):
        attn, arch = layer.self_attn, self.arch
        batch, seq, _ = x.shape
        q = attn.q_proj(x).view(batch, seq, arch.num_heads, arch.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, arch.num_kv_heads, arch.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, arch.num_kv_heads, arch.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k = torch.cat((past_k, k), dim=2)  # [B, kv_heads, past + S, D]
        v = torch.cat((past_v, v), dim=2)
        groups = arch.num_heads // arch.num_kv_heads
        keys = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        values = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        scores = (torch.matmul(q, keys.transpose(2, 3)) * attn.scale).float() + bias  # masked 0: exact as HF
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(batch, seq, arch.num_heads * arch.head_dim)
        return attn.o_proj(out), k, v

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        """Zero-length KV inputs for the first step."""
        arch = self.arch
        shape = (batch, arch.num_kv_heads, 0, arch.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(2 * arch.num_layers)]
