"""Building blocks: RMSNorm, rotary embedding, base linears (dense or NF4) and fused, LoRA-adapted projections.

A layer's projections run as four fused groups: qkv (q|k|v), o, gate_up (gate|up) and down. Each
group is one base GEMM over the concatenated weights (NF4: bitsandbytes' own bytes per slice, see
nf4.format) followed by one LoRA op over all its slices (lora.apply): two kernels where the
unfused model launched five per projection.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.apply import apply_lora, needs_lora
from ..nf4 import ops as nf4_ops
from ..nf4.format import NF4Weight
from . import fused


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): the residual add and the norm as one op."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin: [T, head_dim] for absolute positions [T] (computed in fp32 like transformers)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DenseLinear(nn.Module):
    """y = x W^T + b with W [N, K] in the compute dtype (several slices concatenated along N)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None):
        super().__init__()
        self.slice_features = tuple(w.shape[0] for w in weights)
        weight = weights[0] if len(weights) == 1 else torch.cat(list(weights))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        bias = None if biases is None else (biases[0] if len(biases) == 1 else torch.cat(list(biases)))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward_gate_up_silu(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.forward(x).split(self.slice_features, dim=-1)
        return F.silu(gate) * up

    def dequantized_weight(self, index: int | None = None) -> torch.Tensor:
        """The whole [N, K] weight, or slice `index` of it."""
        if index is None:
            return self.weight
        start = sum(self.slice_features[:index])
        return self.weight[start:start + self.slice_features[index]]


class NF4Linear(nn.Module):
    """y = x dequant(W)^T + b with W held as bitsandbytes NF4 (blocksize 64, double quantization).

    Quantizes each slice exactly as transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant)
    does, so the same fp weights give the same 4-bit weights as an HF + bitsandbytes model; slices
    are fused along N without requantizing (`NF4Weight`).
    """

    def __init__(self, weights: torch.Tensor | Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None):
        super().__init__()
        if isinstance(weights, torch.Tensor):
            weights = [weights]
        if isinstance(biases, torch.Tensor):
            biases = [biases]
        self.nf4 = NF4Weight.quantize(list(weights))
        self.slice_features = self.nf4.segment_rows
        self.in_features, self.out_features = self.nf4.in_features, self.nf4.out_features
        bias = None if biases is None else (biases[0] if len(biases) == 1 else torch.cat(list(biases)))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight_packed(self) -> torch.Tensor:
        """Slice 0's packed bytes in bitsandbytes' shape (a single-slice linear: the whole weight)."""
        return self.nf4.segment_packed(0)

    @property
    def quant_state(self):
        return self.nf4.segment_quant_state(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_ops.linear(x, self.nf4, self.bias)

    def forward_gate_up_silu(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_ops.linear_gate_up_silu(x, self.nf4, self.bias)

    def dequantized_weight(self, index: int | None = None) -> torch.Tensor:
        """The whole [N, K] weight (bit-identical to bitsandbytes' dequantize_4bit per slice), or slice `index`."""
        weight = nf4_ops.dequantize(self.nf4)
        if index is None:
            return weight
        start = self.nf4.row_starts[index]
        return weight[start:start + self.slice_features[index]]


def make_linear(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, quantization: str) -> nn.Module:
    """weights already on the target device in the compute dtype; fused along N in the given order."""
    if quantization == "nf4":
        return NF4Linear(weights, biases)
    return DenseLinear(weights, biases)


class ProjectionGroup(nn.Module):
    """A fused base linear (slices e.g. q|k|v) that adds the step's LoRA deltas of all its slices.

    The LoRA pools belong to the engine (`ctx.lora_stacks`), so one model can serve several engines.
    """

    def __init__(self, base: nn.Module, layer: int, name: str, slices: tuple[str, ...]):
        super().__init__()
        self.base = base
        self.layer, self.name, self.slices = layer, name, slices
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slice_features: tuple[int, ...] = tuple(base.slice_features)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        out = self.base(x)
        if ctx.lora is not None:
            apply_lora(out, x, ctx.lora_stacks.group(self.layer, self.name), ctx.lora)
        return out

    def forward_gate_up_silu(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """silu(gate) * up for a gate_up group; the base kernel's fused epilogue when no LoRA touches it."""
        if ctx.lora is None or not needs_lora(ctx.lora_stacks.group(self.layer, self.name), ctx.lora):
            return self.base.forward_gate_up_silu(x)
        gate, up = self.forward(x, ctx).split(self.slice_features, dim=-1)
        return F.silu(gate) * up
