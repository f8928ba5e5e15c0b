"""Triton dequantization of an NF4Weight, bit-identical to `bitsandbytes.functional.dequantize_4bit`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from . import triton_decode as td
from .format import NF4Weight

TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["TOTAL_BLOCKS", "e1", "e2", "e3", "s1", "s2", "s3"])
def _dequant_kernel(out_ptr, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, TOTAL_BLOCKS,
                    e1, e2, e3, s1, s2, s3, BR: tl.constexpr, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr,
                    ASM: tl.constexpr):
    """out.flat[64 g + j] = W element j of 64-block g, for g in [pid * BR, pid * BR + BR) (e1..e3: segment starts
    in blocks, s1..s3: their absmax2 starts)."""
    g = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = g < TOTAL_BLOCKS
    g = tl.minimum(g, TOTAL_BLOCKS - 1)
    # a "row" here is one 64-block: KB64 = 1, block index within the row 0
    seg, local, a2s, off = tc.row_segments(g, e1, e2, e3, s1, s2, s3, offset_ptr, 1)
    kb = tl.zeros([1], dtype=tl.int32)
    am = tc.block_absmax(absq_ptr, code2_ptr, absmax2_ptr, g, seg, local, a2s, off, kb, 1, EXACT)  # [BR, 1]
    j = tl.arange(0, 32)
    packed = tl.load(packed_ptr + g[:, None, None] * 32 + j[None, None, :])  # [BR, 1, 32]
    tab = td.lane_code(code_ptr, ASM)
    w = td.decode_pairs(packed, am[:, :, None], code_ptr, tab, OUT_DTYPE, EXACT, ASM)  # [BR, 1, 64]
    e = tl.arange(0, 64)
    ptrs = out_ptr + g.to(tl.int64)[:, None, None] * 64 + e[None, None, :]
    tl.store(ptrs, w, mask=ok[:, None, None])


def use_asm(t: torch.Tensor, dtype: torch.dtype, asm: bool) -> bool:
    """The shuffle decoder runs on CUDA for bf16/fp16 outputs (inline PTX: not in the interpreter)."""
    return asm and t.is_cuda and dtype in (torch.bfloat16, torch.float16)


def segment_args(w: NF4Weight, unit_rows: bool) -> tuple[int, ...]:
    """(b1, b2, b3, s1, s2, s3): segment starts (in rows, or in 64-blocks) and absmax2 starts; absent = end."""
    starts = w.row_starts if unit_rows else w.block_starts
    end = w.out_features if unit_rows else w.packed.numel() // 32
    bounds = list(starts[1:]) + [end] * (4 - w.num_segments)
    a2 = list(w.absmax2_starts[1:]) + [w.absmax2.numel()] * (4 - w.num_segments)
    return (*bounds, *a2)


def dequantize(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None, block_rows: int = 32,
               num_warps: int = 4, asm: bool = True) -> torch.Tensor:
    """W [N, K] in dtype (bf16/fp16/fp32), bit-identical to bitsandbytes' dequantize_4bit of each segment.

    Needs w.kernel_ok. `out` ([N, K] contiguous, dtype) is written in place when given. asm: use the shuffle
    decoder where it applies (CUDA, bf16/fp16).
    """
    assert w.kernel_ok, "NF4 Triton kernels need K % 64 == 0 and at most 4 segments"
    N, K = w.shape
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=w.device)
    assert out.shape == (N, K) and out.dtype == dtype and out.is_contiguous()
    total = N * K // 64
    grid = (triton.cdiv(total, block_rows),)
    _dequant_kernel[grid](out, w.packed, w.absmax_q, w.absmax2, w.code2, w.offset, w.code, total,
                          *segment_args(w, unit_rows=False), BR=block_rows, OUT_DTYPE=TORCH_TO_TL[dtype],
                          EXACT=w.packed.is_cuda, ASM=use_asm(w.packed, dtype, asm), num_warps=num_warps)
    return out
