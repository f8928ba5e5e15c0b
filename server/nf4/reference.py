"""The PyTorch twin of the NF4 kernels: the CPU path and the oracle the Triton kernels are tested against.

Reads the same bytes as the kernels (see `format.NF4Weight`) with plain torch ops; `dequantize` is bit-identical
to `bitsandbytes.functional.dequantize_4bit` applied to each segment, on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Weight


def absmax(w: NF4Weight) -> torch.Tensor:
    """fp32 [sum_s blocks_s]: absmax[block_starts[s] + b] = fp32(fp32(code2[s, q] * absmax2[s, b // 256]) + offset[s]).

    Two separate roundings, as bitsandbytes' dequantize_blockwise followed by `absmax += offset`.
    """
    out = []
    for s in range(w.num_segments):
        qs = w.segment_quant_state(s)
        q = qs.absmax.long()
        nested = qs.state2.absmax.repeat_interleave(NESTED_BLOCKSIZE)[:q.numel()]
        am = w.code2[s][q] * nested
        out.append(am + w.offset[s])
    return torch.cat(out)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W: [N, K] in `dtype` (default: w.dtype), W[n, k] = dtype(fp32(code[nibble(n, k)] * absmax(block(n, k)))).

    Segments are dequantized one by one and stacked along N (rows of segment s start at row_starts[s]).
    """
    dtype = dtype or w.dtype
    K = w.in_features
    am_all = absmax(w)
    out = torch.empty(w.out_features, K, dtype=dtype, device=w.device)
    for s, n in enumerate(w.segment_rows):
        numel = n * K
        blocks = -(numel // -BLOCKSIZE)
        packed = w.segment_packed(s).reshape(-1)
        nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).long()
        values = w.code[nibbles]  # fp32 [2 * bytes]
        values = torch.nn.functional.pad(values, (0, blocks * BLOCKSIZE - values.numel()))
        am = am_all[w.block_starts[s]:w.block_starts[s] + blocks]
        seg = (values.view(blocks, BLOCKSIZE) * am[:, None]).reshape(-1)[:numel]
        r0 = w.row_starts[s]
        out[r0:r0 + n] = seg.view(n, K).to(dtype)
    return out


def linear_factored(x: torch.Tensor, w: NF4Weight, code_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 [..., N]: sum_b absmax[n, b] * sum_{k in b} x[k] * c[nibble(n, k)], c = code rounded to code_dtype
    (default x.dtype), sums in fp64 then rounded: what the LUT kernel (`gluon_lut`) computes before its fp32
    summation order and the output rounding. Needs K % 64 == 0 (blocks never straddle rows)."""
    K = w.in_features
    assert K % BLOCKSIZE == 0
    codes = w.code.to(code_dtype or x.dtype).double()
    am = absmax(w).double()
    vals = torch.empty(w.out_features, K, dtype=torch.float64, device=w.device)
    for s, n in enumerate(w.segment_rows):
        packed = w.segment_packed(s).reshape(-1)
        nib = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(n, K).long()
        vals[w.row_starts[s]:w.row_starts[s] + n] = codes[nib]
    blocks = K // BLOCKSIZE
    xb = x.reshape(-1, blocks, BLOCKSIZE).double()
    per_block = torch.einsum("mbk,nbk->mnb", xb, vals.view(-1, blocks, BLOCKSIZE))
    am_rows = torch.cat([am[w.block_starts[s]:w.block_starts[s] + n * blocks].view(n, blocks)
                         for s, n in enumerate(w.segment_rows)])
    return (per_block * am_rows).sum(-1).float().reshape(*x.shape[:-1], w.out_features)


def linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., n] = sum_k x[..., k] * W[n, k] (+ bias[n]), W = dequantize(w, x.dtype): [..., K] -> [..., N]."""
    return F.linear(x, dequantize(w, x.dtype), bias)


def linear_gate_up_silu(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = silu(x Wg^T + bg) * (x Wu^T + bu), w: gate [I, K] and up [I, K] segments: [..., K] -> [..., I].

    Rounded like the unfused MLP: gate and up in x.dtype, silu rounded to x.dtype, the product rounded.
    """
    check_gate_up(w)
    gate_up = linear(x, w, bias)
    gate, up = gate_up.split(w.segment_rows[0], dim=-1)
    return F.silu(gate) * up


def check_gate_up(w: NF4Weight) -> None:
    if w.num_segments != 2 or w.segment_rows[0] != w.segment_rows[1]:
        raise ValueError(f"gate_up weight must have two equal segments (gate, up), got {w.segment_rows}")
