"""NF4Weight: bitsandbytes NF4 weights (blocksize 64, double-quantized absmax) as they are, fused along N.

No requantization: the bytes are bitsandbytes' own, so the values are the ones QLoRA adapters were
trained against. Element (n, k) of the [N, K] weight lies in segment s (rows row_starts[s] ..
row_starts[s] + segment_rows[s]); with e = (n - row_starts[s]) * K + k its index in that segment's
flattened [N_s, K] weight and b = e // 64 its block:

    byte   = packed[byte_starts[s] + e // 2]
    nibble = byte >> 4 if e is even else byte & 15           # element 2i in the HIGH nibble
    absmax = fp32(code2[s, absmax_q[block_starts[s] + b]] * absmax2[absmax2_starts[s] + b // 256])
    absmax = fp32(absmax + offset[s])                         # a second, separate rounding
    W[n, k] = dtype(fp32(code[nibble] * absmax))              # rounded once to the output dtype

which is exactly `bitsandbytes.functional.dequantize_4bit` of each segment (see `reference.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

BLOCKSIZE = 64
"""Elements per absmax block (bitsandbytes' blocksize)."""
NESTED_BLOCKSIZE = 256
"""absmax values per nested (second-level) absmax."""
MAX_KERNEL_SEGMENTS = 4
"""Segments the Triton kernels select among (q/k/v = 3, gate/up = 2)."""


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


@dataclass(frozen=True, slots=True)
class NF4Weight:
    """A [N, K] NF4 weight made of one or several bitsandbytes-quantized segments stacked along N."""

    packed: torch.Tensor
    """uint8 [sum_s ceil(N_s*K/2)]: every segment's packed bytes, concatenated."""
    absmax_q: torch.Tensor
    """uint8 [sum_s ceil(N_s*K/64)]: 8-bit codes of each block's absmax (minus the segment's offset)."""
    absmax2: torch.Tensor
    """fp32 [sum_s ceil(blocks_s/256)]: the nested absmax, one per 256 blocks of a segment."""
    code2: torch.Tensor
    """fp32 [S, 256]: each segment's nested code table (bitsandbytes' dynamic map)."""
    offset: torch.Tensor
    """fp32 [S]: each segment's absmax mean, added back after the nested dequantization."""
    code: torch.Tensor
    """fp32 [16]: the NF4 code table (quant_state.code)."""
    in_features: int
    """K."""
    segment_rows: tuple[int, ...]
    """N_s of each segment, in order (sum: N)."""
    dtype: torch.dtype
    """The dtype the segments were quantized from (quant_state.dtype)."""
    row_starts: tuple[int, ...] = field(init=False)
    byte_starts: tuple[int, ...] = field(init=False)
    block_starts: tuple[int, ...] = field(init=False)
    absmax2_starts: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        K, rows = self.in_features, self.segment_rows
        problems = []
        if not rows or any(n <= 0 for n in rows) or K <= 0:
            problems.append(f"bad shape: segment_rows={rows}, in_features={K}")
        starts = {"row": [0], "byte": [0], "block": [0], "absmax2": [0]}
        for n in rows:
            blocks = _cdiv(n * K, BLOCKSIZE)
            starts["row"].append(starts["row"][-1] + n)
            starts["byte"].append(starts["byte"][-1] + _cdiv(n * K, 2))
            starts["block"].append(starts["block"][-1] + blocks)
            starts["absmax2"].append(starts["absmax2"][-1] + _cdiv(blocks, NESTED_BLOCKSIZE))
        expect = [
            ("packed", self.packed, torch.uint8, (starts["byte"][-1],)),
            ("absmax_q", self.absmax_q, torch.uint8, (starts["block"][-1],)),
            ("absmax2", self.absmax2, torch.float32, (starts["absmax2"][-1],)),
            ("code2", self.code2, torch.float32, (len(rows), NESTED_BLOCKSIZE)),
            ("offset", self.offset, torch.float32, (len(rows),)),
            ("code", self.code, torch.float32, (16,)),
        ]
        for name, t, dtype, shape in expect:
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
                problems.append(f"{name}: expected contiguous {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
            if t.device != self.packed.device:
                problems.append(f"{name} on {t.device}, packed on {self.packed.device}")
        if problems:
            raise ValueError("invalid NF4Weight: " + "; ".join(problems))
        object.__setattr__(self, "row_starts", tuple(starts["row"][:-1]))
        object.__setattr__(self, "byte_starts", tuple(starts["byte"][:-1]))
        object.__setattr__(self, "block_starts", tuple(starts["block"][:-1]))
        object.__setattr__(self, "absmax2_starts", tuple(starts["absmax2"][:-1]))

    # ------------------------------------------------------------------------------------ shape
    @property
    def out_features(self) -> int:
        return sum(self.segment_rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def num_segments(self) -> int:
        return len(self.segment_rows)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def kernel_ok(self) -> bool:
        """The Triton kernels' precondition: rows made of whole 64-blocks, at most 4 segments."""
        return self.in_features % BLOCKSIZE == 0 and self.num_segments <= MAX_KERNEL_SEGMENTS

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: packed nibbles + absmax codes + nested absmax + tables."""
        return sum(t.numel() * t.element_size()
                   for t in (self.packed, self.absmax_q, self.absmax2, self.code2, self.offset, self.code))

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_bnb(cls, parts: Sequence[tuple[torch.Tensor, object]]) -> "NF4Weight":
        """Fuse (packed, bitsandbytes QuantState) pairs along N, in order; the bytes are shared, not copied
        when there is one part (several parts are concatenated)."""
        if not parts:
            raise ValueError("NF4Weight.from_bnb needs at least one (packed, quant_state) pair")
        rows, K, dtype, code = [], None, None, None
        for i, (packed, qs) in enumerate(parts):
            problems = []
            if qs.quant_type != "nf4" or qs.blocksize != BLOCKSIZE:
                problems.append(f"quant_type={qs.quant_type} blocksize={qs.blocksize} (need nf4, 64)")
            if not qs.nested or qs.state2.blocksize != NESTED_BLOCKSIZE or qs.absmax.dtype != torch.uint8:
                problems.append("statistics must be double-quantized (compress_statistics=True)")
            if len(qs.shape) != 2:
                problems.append(f"shape {tuple(qs.shape)} is not 2-D")
            elif K is not None and qs.shape[1] != K:
                problems.append(f"in_features {qs.shape[1]} != {K} of the first part")
            if code is not None and not torch.equal(qs.code.float().cpu(), code.cpu()):
                problems.append("NF4 code table differs from the first part's")
            if problems:
                raise ValueError(f"part {i}: " + "; ".join(problems))
            K, dtype = int(qs.shape[1]), dtype or qs.dtype
            code = qs.code.float() if code is None else code
            rows.append(int(qs.shape[0]))

        def cat(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0].contiguous() if len(ts) == 1 else torch.cat(ts).contiguous()

        device = parts[0][0].device
        return cls(
            packed=cat([p.reshape(-1).view(torch.uint8) for p, _ in parts]),
            absmax_q=cat([qs.absmax.reshape(-1) for _, qs in parts]),
            absmax2=cat([qs.state2.absmax.reshape(-1).float() for _, qs in parts]),
            code2=torch.stack([qs.state2.code.float().to(device) for _, qs in parts]).contiguous(),
            offset=torch.stack([qs.offset.float().reshape(()).to(device) for _, qs in parts]).contiguous(),
            code=code.to(device).contiguous(), in_features=K, segment_rows=tuple(rows), dtype=dtype)

    @classmethod
    def quantize(cls, weights: torch.Tensor | Sequence[torch.Tensor]) -> "NF4Weight":
        """Quantize each [N_s, K] float weight as transformers' BitsAndBytesConfig(nf4, double quant) does,
        then fuse them along N (each segment keeps its own statistics, as separate modules would)."""
        import bitsandbytes.functional as bnbf

        if isinstance(weights, torch.Tensor):
            weights = [weights]
        parts = [bnbf.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                    quant_type="nf4", quant_storage=torch.uint8) for w in weights]
        return cls.from_bnb(parts)

    # ----------------------------------------------------------------------- per-segment views
    def segment_packed(self, i: int) -> torch.Tensor:
        """Segment i's packed bytes in bitsandbytes' shape [ceil(N_i*K/2), 1] (a view)."""
        start, n = self.byte_starts[i], _cdiv(self.segment_rows[i] * self.in_features, 2)
        return self.packed[start:start + n].view(n, 1)

    def segment_quant_state(self, i: int):
        """Segment i's bitsandbytes QuantState (views of our tensors; absmax, code and offset compare equal
        to the ones bitsandbytes made)."""
        from bitsandbytes.functional import QuantState

        n = self.segment_rows[i]
        blocks = _cdiv(n * self.in_features, BLOCKSIZE)
        a2 = _cdiv(blocks, NESTED_BLOCKSIZE)
        b0, c0 = self.block_starts[i], self.absmax2_starts[i]
        state2 = QuantState(absmax=self.absmax2[c0:c0 + a2], code=self.code2[i], blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
        return QuantState(absmax=self.absmax_q[b0:b0 + blocks], shape=torch.Size((n, self.in_features)),
                          code=self.code, blocksize=BLOCKSIZE, quant_type="nf4", dtype=self.dtype,
                          offset=self.offset[i], state2=state2)

    def to(self, device: torch.device | str) -> "NF4Weight":
        """The same weight on another device (no-op when already there)."""
        device = torch.device(device)
        if self.packed.device == device:
            return self
        return NF4Weight(
            packed=self.packed.to(device), absmax_q=self.absmax_q.to(device), absmax2=self.absmax2.to(device),
            code2=self.code2.to(device), offset=self.offset.to(device), code=self.code.to(device),
            in_features=self.in_features, segment_rows=self.segment_rows, dtype=self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by field name (to register as module buffers)."""
        return {"packed": self.packed, "absmax_q": self.absmax_q, "absmax2": self.absmax2, "code2": self.code2,
                "offset": self.offset, "code": self.code}
