"""Building blocks: RMSNorm, rotary embedding, base linears (dense or NF4) and the LoRA-adapted projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import ops as lora_ops


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' LlamaRMSNorm, for bit-level parity in fp32.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin: [T, head_dim] for absolute positions [T] (computed in fp32 like transformers)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention (HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DenseLinear(nn.Module):
    """y = x W^T + b with W in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight


class NF4Linear(nn.Module):
    """y = x dequant(W)^T + b with W held as bitsandbytes NF4 (blocksize 64, double quantization).

    Quantizes exactly as transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant) does, so
    the same fp weights give the same 4-bit weights as an HF + bitsandbytes model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compress_statistics: bool = True):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed, self.quant_state = bnbf.quantize_4bit(
            weight.contiguous(), blocksize=64, compress_statistics=compress_statistics, quant_type="nf4",
            quant_storage=torch.uint8)
        self.weight_packed = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight_packed.t(), bias=self.bias, quant_state=self.quant_state)

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight_packed, self.quant_state)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str) -> nn.Module:
    """weight already on the target device in the compute dtype."""
    if quantization == "nf4":
        return NF4Linear(weight, bias)
    return DenseLinear(weight, bias)


class AdaptedProjection(nn.Module):
    """A base linear that adds the step's LoRA deltas; the slot stacks belong to the engine.

    `index` numbers the projection in model order; the forward context's `lora_slots` holds its
    stacks (lora_a [S, R, in], lora_b_by_out [out, S, R]), so one model can serve several engines.
    """

    def __init__(self, base: nn.Module, module_name: str):
        super().__init__()
        self.base = base
        self.module_name = module_name
        self.in_features, self.out_features = base.in_features, base.out_features
        self.index = -1

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        out = self.base(x)
        lora = ctx.lora
        if lora is not None and self.module_name in lora.target_modules:
            lora_a, lora_b_by_out = ctx.lora_slots.stacks[self.index]
            lora_ops.add_lora(out, x, lora_a, lora_b_by_out.permute(1, 0, 2), lora, ctx.lora_backend)
        return out
