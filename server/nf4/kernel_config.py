"""Launch configurations of the NF4 matmul kernels, their shared-memory needs, and the heuristic used when no tuned
entry exists.

Every config that reaches a launch goes through `fit`: it is made valid for the activation dtype and the shape
(fp32 activations never meet a kernel or tile that overflows shared memory; the LUT kernel only takes bf16/fp16
activations, K tiled exactly and M within its tile), so no (M, shape, dtype) raises at run time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

KERNELS = ("gemv", "gemm", "dequant_mm", "lut")
LUTS = ("lds", "shfl")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Rows of x are rounded up to one of these; above the last, prefill dequantizes into cuBLAS."""
SMEM_LIMIT = 232448
"""Shared memory per block on sm_90 (H100/H200), bytes; also the bound the CPU tests hold every config to."""
LUT_MAX_M = 64
"""The LUT kernel holds all rows of x in one tile (block_m <= 64)."""
LUT_MAX_GATED_M = 32
"""Gated LUT configs with a larger tile run as the plain LUT matmul of the fused weight followed by the SiLU x up
epilogue in torch (two accumulators of 64 rows spill on sm_90)."""


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One launch: which kernel and its tile sizes."""

    kernel: str = "gemm"
    """gemv (CUDA-core FMAs, M <= 4), gemm (tl.dot tiles), lut (Gluon tensor-core kernel with the block absmax
    factored out, `gluon_lut`; bf16/fp16 only) or dequant_mm (dequantize, then cuBLAS)."""
    block_m: int = 16
    """Rows of x per program (gemm: >= 16; lut: all rows of x, 8..64)."""
    block_n: int = 64
    """Output columns per program (lut: 16 * (num_warps / k_warps) * a power of two)."""
    block_k: int = 128
    """K elements per loop step (a multiple of 64; lut: per warp, 64, 128 or 256)."""
    split_k: int = 1
    """K chunks reduced in fixed order afterwards (1: no workspace)."""
    swap_ab: bool = False
    """gemm only: compute W x^T so small M sits in the MMA's N dimension."""
    num_warps: int = 4
    num_stages: int = 3
    decode_asm: bool = True
    """gemm/gemv: decode nibbles with warp shuffles (inline PTX, CUDA bf16/fp16) rather than table loads."""
    k_warps: int = 1
    """lut: warps of a program splitting its K chunk (their sums are added once, in warp order)."""
    lut: str = "lds"
    """lut: code pairs from a 64 KiB shared-memory table indexed by the weight byte ("lds"), or from warp shuffles
    ("shfl", no shared memory)."""
    max_regs: int = 0
    """lut: registers per thread ptxas may use (0: its choice); 128 lets two 8-warp programs share an SM."""

    def __post_init__(self) -> None:
        problems = []
        if self.kernel not in KERNELS:
            problems.append(f"kernel {self.kernel!r} not in {KERNELS}")
        if self.block_k % 64 or self.block_k <= 0:
            problems.append(f"block_k {self.block_k} is not a positive multiple of 64")
        for name in ("block_m", "block_n", "block_k", "num_warps", "k_warps"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                problems.append(f"{name} {v} is not a power of two")
        if self.kernel == "gemm" and (self.block_m < 16 or self.block_n < 16):
            problems.append("gemm tiles need block_m, block_n >= 16")
        if self.kernel == "lut":
            wn = self.num_warps // self.k_warps
            if self.num_warps % self.k_warps or self.block_n % (16 * max(wn, 1)):
                problems.append(f"lut: block_n {self.block_n} is not a multiple of 16 x {wn} row warps")
            if not 8 <= self.block_m <= LUT_MAX_M or self.block_k > 256 or self.lut not in LUTS:
                problems.append(f"lut: block_m {self.block_m} (8..64), block_k {self.block_k} (<= 256), "
                                f"lut {self.lut!r} ({LUTS})")
        if self.split_k < 1:
            problems.append(f"split_k {self.split_k} < 1")
        if problems:
            raise ValueError("invalid KernelConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def m_bucket(m: int) -> int | None:
    """The smallest bucket >= m, or None above the largest (prefill)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------ shared memory
def smem_bytes(cfg: KernelConfig, elem_bytes: int, gated: bool) -> int:
    """Upper estimate of a config's shared memory (bytes) for activations of `elem_bytes` bytes.

    gemm/gemv (Triton 3.6, sm_90): num_stages buffers of the x tile and of the packed weight bytes (both weight
    operands when gated), the decoded weight tile staged for the MMA (once for 2-byte activations, whose gate and up
    tiles reuse it; fp32 operands take ~(weights + 0.8) tiles; the table-load decoder adds two tiles per weight),
    and the output tile. Checked against every sm_90 compile of the tuner's gemm/gemv shapes in bf16/fp16/fp32,
    gated or not (estimate >= actual: tests/nf4/test_reference.py pins a few).
    lut: its 64 KiB table (or, with shuffles, the final cross-warp sums); dequant_mm: none (cuBLAS).
    """
    if cfg.kernel == "dequant_mm":
        return 0
    if cfg.kernel == "lut":
        sums = (1 + (gated and cfg.block_m <= LUT_MAX_GATED_M)) * cfg.k_warps * cfg.block_n * cfg.block_m * 4
        return max(65536, sums) if cfg.lut == "lds" else sums
    stages = max(1, cfg.num_stages)
    weights = 2 if gated else 1
    tile = cfg.block_n * cfg.block_k * elem_bytes
    x_tile = stages * cfg.block_m * cfg.block_k * elem_bytes
    packed = stages * weights * cfg.block_n * cfg.block_k // 2
    decoded = tile if elem_bytes == 2 else int((weights + 0.8) * tile)
    if not cfg.decode_asm and elem_bytes == 2:
        decoded += 2 * weights * tile
    return x_tile + packed + decoded + cfg.block_m * cfg.block_n * 4


def fits(cfg: KernelConfig, elem_bytes: int, gated: bool, limit: int = SMEM_LIMIT) -> bool:
    return smem_bytes(cfg, elem_bytes, gated) <= limit


def _shrink(cfg: KernelConfig, elem_bytes: int, gated: bool, limit: int) -> KernelConfig:
    """Smaller pipelines, then K steps, then tiles, until the config fits `limit` (gemm/gemv)."""
    while not fits(cfg, elem_bytes, gated, limit):
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_k > 64:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.block_n > 16:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.kernel == "gemm" and cfg.block_m > 16:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        elif cfg.kernel == "gemv" and cfg.block_m > 1:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        else:
            return KernelConfig(kernel="dequant_mm")
    return cfg


def lut_split(k: int, cfg: KernelConfig) -> int | None:
    """The largest split <= cfg.split_k that tiles K exactly in steps of every warp (64 * NB * KW), or None."""
    unit = cfg.block_k * cfg.k_warps
    if k % unit:
        return None
    steps = k // unit
    for split in range(min(cfg.split_k, steps), 0, -1):
        if steps % split == 0:
            return split
    return None


def fit(cfg: KernelConfig, m: int, n_out: int, k: int, elem_bytes: int, gated: bool, num_sms: int,
        limit: int = SMEM_LIMIT) -> KernelConfig:
    """`cfg` made valid for this call: a LUT config for fp32 activations, an M past its tile or a K it cannot tile
    becomes the heuristic's other kernels; any gemm/gemv is shrunk until it fits `limit` bytes of shared memory."""
    if cfg.kernel == "dequant_mm":
        return cfg
    if cfg.kernel == "lut":
        if elem_bytes == 2 and m <= LUT_MAX_M:
            if cfg.block_m < m:
                bm = max(8, _pow2_at_least(m))
                cfg = replace(cfg, block_m=bm, block_k=min(cfg.block_k, 64 * lut_blocks_per_step(bm, gated)),
                              max_regs=0)
            split = lut_split(k, cfg)
            if split is not None and fits(cfg, elem_bytes, gated, limit):
                return replace(cfg, split_k=split)
            for bk in dict.fromkeys((max(64, cfg.block_k // 2), 64)):  # fewer blocks a step, then no K warps
                for kw in dict.fromkeys((cfg.k_warps, 1)):
                    smaller = replace(cfg, block_k=bk, k_warps=kw,
                                      block_n=max(cfg.block_n, 16 * (cfg.num_warps // kw)))
                    split = lut_split(k, smaller)
                    if split is not None and fits(smaller, elem_bytes, gated, limit):
                        return replace(smaller, split_k=split)
        cfg = mma_config(m, n_out, k, num_sms)
    return _shrink(cfg, elem_bytes, gated, limit)


# ------------------------------------------------------------------------------------------ heuristics
def fill_split(programs: int, k: int, block_k: int, num_sms: int) -> int:
    """Smallest power-of-two split-K giving >= 2 waves of programs while each chunk keeps >= 4 loop steps."""
    split = 1
    while programs * split < 2 * num_sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def mma_config(m: int, n_out: int, k: int, num_sms: int) -> KernelConfig:
    """The tl.dot kernels (any dtype): swap-AB tiles up to M = 64, 128x128 tiles at 128, dequantize + cuBLAS for
    prefill. Callers fit it to the dtype."""
    bucket = m_bucket(m)
    if bucket is None:
        return KernelConfig(kernel="dequant_mm")
    if bucket <= 64:
        bm, bn, bk, swap, warps = max(16, bucket), 128, 128, True, 4
    else:
        bm, bn, bk, swap, warps = 128, 128, 128, False, 8
    programs = -(-m // bm) * -(-n_out // bn)
    split = fill_split(programs, k, bk, num_sms)
    return KernelConfig(kernel="gemm", block_m=bm, block_n=bn, block_k=bk, split_k=split, swap_ab=swap,
                        num_warps=warps, num_stages=3)


def lut_config(m: int, n_out: int, k: int, num_sms: int, gated: bool = False) -> KernelConfig:
    """The LUT kernel for bf16/fp16 decode (M <= 64), before `fit`: 8 warps of 16 weight rows, which split K 8 ways
    up to M = 16 (2 above), and a grid split of K until ~3 programs per SM (the 64 KiB table allows 3)."""
    bm = max(8, _pow2_at_least(m))
    nb = lut_blocks_per_step(bm, gated)
    kw = 8 if m <= 16 else 2
    wn = 8 // kw
    bn = 16 * wn
    tiles = -(-n_out // bn)
    steps = k // (64 * nb * kw) if k % (64 * nb * kw) == 0 else 0
    split = 1
    while steps and tiles * split < 3 * num_sms and steps % (split * 2) == 0:
        split *= 2
    return KernelConfig(kernel="lut", block_m=bm, block_n=bn, block_k=64 * nb, split_k=split, num_warps=8,
                        k_warps=kw, max_regs=lut_max_regs(bm, gated, kw))


def lut_blocks_per_step(block_m: int, gated: bool = False) -> int:
    """64-blocks per LUT step: 4 up to 16 rows of x (gated: 2 at 8 rows, else 1), fewer above: each block's
    partial sums take block_m / 2 registers per thread (sm_90 compiles of 8 warps stay within ~128 registers)."""
    if gated and block_m <= LUT_MAX_GATED_M:
        return {8: 2}.get(block_m, 1)
    return {8: 4, 16: 4, 32: 2}.get(block_m, 1)


def lut_max_regs(block_m: int, gated: bool, k_warps: int = 8) -> int:
    """Register cap of an 8-warp LUT program: 128 (two per SM) where ptxas then needs no spills in the loop
    (offline sm_90 compiles: 16 rows of x with 8 K warps, 64 rows), else 0 (its choice)."""
    return 128 if block_m == 64 or (not gated and block_m == 16 and k_warps == 8) else 0


def default_config(m: int, n_out: int, k: int, num_sms: int, elem_bytes: int = 2, gated: bool = False) -> KernelConfig:
    """Heuristic config for an untuned (shape, M, dtype), fitted: the LUT kernel for bf16/fp16 up to M = 64 (the
    fewest instructions per weight in offline SASS counts), the tl.dot kernels otherwise, cuBLAS for prefill."""
    if m_bucket(m) is None:
        return KernelConfig(kernel="dequant_mm")
    lut = elem_bytes == 2 and m <= LUT_MAX_M
    cfg = lut_config(m, n_out, k, num_sms, gated) if lut else mma_config(m, n_out, k, num_sms)
    return fit(cfg, m, n_out, k, elem_bytes, gated, num_sms)
