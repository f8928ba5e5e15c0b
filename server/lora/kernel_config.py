"""Launch configuration of the LoRA kernels: every block-size and work-partition choice lives here.

Inputs are shapes, the (padded) token count and a rank bound only, never a step's data, so a CUDA
graph captured for a batch bucket replays with the same configuration whatever adapters the step
carries. How much work each program takes is decided on the device from the step's block count
(see triton_expand / triton_shrink): the grid is fixed, the partition follows the step.
`OVERRIDES` lets a benchmark sweep or a per-GPU tuned table replace the heuristic for a shape.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MIN_BLOCK_M = 16
"""Smallest token block (tl.dot needs 16 rows); sizes the metadata's block capacity."""
MAX_SPLIT_K = 32
MIN_K_PER_SPLIT = 256
MAX_BLOCK_R = 128
FUSED_MAX_K = 8192
"""Fused single-kernel path only when one program can stream a whole A (rank x K) quickly."""
FUSED_MAX_TOKENS = 256
"""... and for decode-sized steps (each program recomputes its block's x @ A^T; prefill shares it instead)."""
STAGE_BYTES = 40 << 10
"""x and A tiles of one pipeline stage of x @ A^T: [block_m + block_r, block_k] elements within this (rows past
a slot's rank are masked, so they cost shared memory, not bandwidth)."""
WORKSPACE_MAX_ELEMENTS = 1 << 22
"""Two-kernel path: the split-K work space (fp32) stays below 16 MiB unless one split alone needs more."""


@dataclass(frozen=True, slots=True)
class LoraKernelConfig:
    fused: bool
    """True: one kernel per group (each program: its block's x @ A^T over all of K, then its output tiles).
    False: shrink (split-K partials into a work space) + expand (sums them in a fixed order)."""
    block_k: int
    """K elements per inner step of x @ A^T."""
    block_r: int
    """Rank rows per chunk (a power of two >= 16); a slot of rank r takes cdiv(r, block_r) chunks."""
    block_n: int
    """Output columns per tile."""
    programs: int
    """Fused / expand: grid size (persistent programs). The device cuts each slice's column tiles into
    chunks by a cost model (triton_expand) and deals the (block, chunk) items round-robin."""
    l2_streams: int = 64
    """Cost model: L2 bandwidth in units of one program's streaming rate (the number of programs that can
    stream from L2 at full speed at once)."""
    split_programs: int = 0
    """Shrink: grid size and target; K splits = clamp(split_programs // (blocks * slices), 1, max_split)."""
    max_split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = True
    """Launch with programmatic dependent launch on sm_90+ (see triton_shrink.pdl_options)."""


OVERRIDES: dict[tuple, LoraKernelConfig] = {}
"""(num_tokens, num_slices, in_features, max_slice_out, rank_bound, dtype) -> config, consulted first."""


def block_m_for(num_tokens: int) -> int:
    """Token rows per block for a step of `num_tokens` (padded) tokens: small for decode, larger for prefill."""
    if num_tokens <= 256:
        return 16
    return 32 if num_tokens <= 1024 else 64


def max_blocks_for(num_tokens: int, block_m: int, max_groups: int) -> int:
    """Upper bound on token blocks: each group adds at most one partial block, and groups <= tokens."""
    return -(-num_tokens // block_m) + min(max_groups, num_tokens)


def num_token_blocks(meta, num_tokens: int) -> int:
    """Token blocks a launch must allow for, for `meta` (a LoraStepMeta) and x of `num_tokens` rows: the
    capacity bound for graph-safe metas (fixed per batch bucket), else the step's exact count."""
    if not meta.graph_safe:
        return meta.num_blocks
    return min(meta.max_blocks, max_blocks_for(num_tokens, meta.block_m, meta.max_groups))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs sm_90+."""
    if device.type != "cuda":
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on CPU: any plausible value (results do not depend on it)
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_at_least(v: float) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def _pow2_at_most(v: float) -> int:
    p = 1
    while 2 * p <= v:
        p *= 2
    return p


def rank_block(rank_bound: int) -> int:
    """block_r for ranks up to rank_bound: the bound rounded up to a power of two, 16..MAX_BLOCK_R."""
    return min(MAX_BLOCK_R, max(16, _pow2_at_least(rank_bound)))


def _block_k(in_features: int, rows: int, budget: int) -> int:
    """Largest power of two <= budget / rows (16..512) dividing K when one does (no K masks in the loop)."""
    bk = max(16, min(512, _pow2_at_most(budget // rows)))
    while bk > 16 and in_features % bk:
        bk //= 2
    return bk


def choose(num_tokens: int, block_m: int, num_slices: int, in_features: int, max_slice_out: int, rank_bound: int,
           dtype: torch.dtype, sms: int, pairs: int = 1, pool_rank: int | None = None) -> LoraKernelConfig:
    """Heuristic. Decode-sized steps on K <= FUSED_MAX_K: one fused kernel, ~one work item per SM (the
    shared-adapter case is latency bound: one launch, each program streams one slice's A from L2 once).
    Otherwise split-K shrink (2 programs per SM) + expand. Tiles: [block_m, block_n] fp32 accumulators of
    <= 4096 (half) / 2048 (fp32) elements, x and A tiles of <= STAGE_BYTES per pipeline stage.

    rank_bound (>= every rank the step reads) sets block_r only; block_k and the split-K limit follow the
    pools' max rank (pool_rank) and the metadata's pair capacity (pairs), so a step's numerics never depend
    on which ranks it happens to carry: the sums run in the same order whatever block_r is (rows past a
    rank are exact zeros), and eager steps match graph replays (which use the pools' max rank as the
    bound) bit for bit."""
    pool_rank = rank_bound if pool_rank is None else pool_rank
    key = (num_tokens, num_slices, in_features, max_slice_out, rank_bound, dtype)
    if key in OVERRIDES:
        return OVERRIDES[key]
    return _heuristic(num_tokens, block_m, num_slices, in_features, max_slice_out, rank_bound, dtype, sms, pairs,
                      pool_rank)


@functools.lru_cache(maxsize=4096)
def _heuristic(num_tokens, block_m, num_slices, in_features, max_slice_out, rank_bound, dtype, sms, pairs,
               pool_rank) -> LoraKernelConfig:
    half = dtype in (torch.float16, torch.bfloat16)
    block_r = rank_block(rank_bound)
    pool_block_r = rank_block(pool_rank)
    budget = 4096 if half else 2048
    esize = 2 if half else 4
    block_k = _block_k(in_features, block_m + pool_block_r, STAGE_BYTES // esize)
    block_n = max(32, min(256 if half else 128, budget // block_m, 2 * budget // block_r,
                          _pow2_at_least(max_slice_out)))
    fused = in_features <= FUSED_MAX_K and num_tokens <= FUSED_MAX_TOKENS
    # The split-K limit bounds the work space; for decode-sized steps it assumes the largest such step, so an
    # eager step and the graph replay of its batch bucket split K alike (same sums, same bits).
    tokens_ref = FUSED_MAX_TOKENS if num_tokens <= FUSED_MAX_TOKENS else num_tokens
    per_split = num_slices * tokens_ref * pairs * -(-pool_rank // pool_block_r) * pool_block_r
    max_split = max(1, min(MAX_SPLIT_K, in_features // MIN_K_PER_SPLIT, WORKSPACE_MAX_ELEMENTS // per_split))
    # Fused: one program per SM streams its slice's A. Three stages (not four): b32 distinct 79.1 -> 76.5 us a
    # layer on an H200 (`lora_device_check.py --sweep`, 2026-12-02), b1 and b8 shared unchanged.
    # Two-kernel prefill: two expand programs per SM hide the latency of the out tiles' read-modify-write.
    programs = sms if fused or block_m < 32 else 2 * sms
    return LoraKernelConfig(fused=fused, block_k=block_k, block_r=block_r, block_n=block_n, programs=programs,
                            split_programs=2 * sms, max_split=max_split, num_stages=3)
