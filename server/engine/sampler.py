"""Batched sampling for a continuous batch: one row per sequence, each row with its own parameters.

Semantics follow HF `generate` in its order: repetition penalty, temperature, top-k, top-p, then a
draw (temperature 0 = greedy argmax of the penalized logits). The draw is the exponential race
`argmax(log p - log(-log u))` with `u[b, v] = hash(seed_b, step_b, v)`: a counter-based hash instead
of a torch.Generator, so a seeded row's token depends only on (seed, step, logits), never on the
batch around it, and CPU and CUDA compute the same integers. `sample` makes no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_U64 = 2**64


@dataclass(slots=True)
class RowSampling:
    """One sequence's sampling parameters for this step."""

    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    """uint64 (Python int in [0, 2**64))."""
    step: int = 0
    """Tokens this sequence has generated so far: the hash counter."""
    penalty_token_ids: Sequence[int] = ()
    """Prompt + generated ids; read only when repetition_penalty != 1."""
    num_logprobs: int = 0
    """Top alternatives wanted (0 = none)."""


@dataclass(slots=True)
class SamplingTensors:
    """Per-row tensors on the device, built once per step, plus host flags that let common cases skip work."""

    temperature: torch.Tensor  # [B, 1] fp32, greedy rows hold 1 (never divided by 0)
    top_p_cut: torch.Tensor    # [B, 1] fp32, 1 - top_p (HF's cut on the ascending cumsum); -1 = off
    penalty: torch.Tensor      # [B, 1] fp32
    greedy: torch.Tensor       # [B] bool
    top_k: torch.Tensor        # [B] int64, 0 = off
    seed: torch.Tensor         # [B] int64, the uint64 seed in two's complement
    step: torch.Tensor         # [B] int64
    penalty_rows: torch.Tensor  # [N] int64: row of each penalty id
    penalty_ids: torch.Tensor   # [N] int64
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    max_top_k: int
    any_top_p: bool
    any_penalty: bool
    max_logprobs: int


@dataclass(slots=True)
class SampleOutput:
    token_ids: torch.Tensor            # [B] int64
    logprobs: torch.Tensor             # [B] fp32: log_softmax(raw logits) at token_ids
    top_ids: torch.Tensor | None       # [B, max_logprobs] int64, best first
    top_logprobs: torch.Tensor | None  # [B, max_logprobs] fp32


def seed_to_int64(seed: int) -> int:
    """uint64 -> int64 two's complement (same 64 bits), so seeds >= 2**63 fit an int64 tensor."""
    assert 0 <= seed < _U64, seed
    return seed - _U64 if seed >= 2**63 else seed


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_sampling_tensors(rows: Sequence[RowSampling], device) -> SamplingTensors:
    """O(rows) Python (plus the penalty ids of penalized rows); three host->device copies."""
    # Python floats are rounded to fp32 here exactly as HF's `scores / temperature` etc. round them.
    floats = torch.tensor([[r.temperature if r.temperature > 0 else 1.0,
                            1.0 - r.top_p if r.top_p < 1.0 else -1.0,
                            r.repetition_penalty] for r in rows], dtype=torch.float32).reshape(-1, 3)
    ints = torch.tensor([[seed_to_int64(r.seed), r.step, r.top_k, r.temperature == 0] for r in rows],
                        dtype=torch.int64).reshape(-1, 4)
    penalized = [(i, r.penalty_token_ids) for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
    ids = torch.tensor(list(chain.from_iterable(p for _, p in penalized)), dtype=torch.int64)
    lengths = torch.tensor([len(p) for _, p in penalized], dtype=torch.int64)
    row_of_id = torch.repeat_interleave(torch.tensor([i for i, _ in penalized], dtype=torch.int64), lengths)
    floats, ints = _to_device(floats, device), _to_device(ints, device)
    sampled = [r for r in rows if r.temperature > 0]
    top_ks = [r.top_k for r in sampled if r.top_k > 0]
    return SamplingTensors(
        temperature=floats[:, 0:1], top_p_cut=floats[:, 1:2], penalty=floats[:, 2:3],
        seed=ints[:, 0], step=ints[:, 1], top_k=ints[:, 2], greedy=ints[:, 3].bool(),
        penalty_rows=_to_device(row_of_id, device), penalty_ids=_to_device(ids, device),
        all_greedy=not sampled, any_greedy=len(sampled) < len(rows), any_top_k=bool(top_ks),
        max_top_k=max(top_ks, default=0), any_top_p=any(r.top_p < 1.0 for r in sampled),
        any_penalty=bool(penalized), max_logprobs=max((r.num_logprobs for r in rows), default=0))


# ---- counter-based hash: 32-bit arithmetic carried in int64 tensors ----

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32): c split in 16-bit halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 finalizer: a bijection on [0, 2**32) with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_hash(seed: torch.Tensor, step: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """hash[b, v] in [0, 2**32) from (seed[b] as uint64 bits, step[b], vocab_ids[v]); all int64.

    key_b = mix(mix(mix(seed_lo ^ K) ^ seed_hi) ^ step) is a bijection of step for a fixed seed, so a
    sequence never repeats a key; v enters through a Weyl step (odd multiplier) and one more mix.
    """
    key = _mix32((seed & _M32) ^ 0x9E3779B9)
    key = _mix32(key ^ ((seed >> 32) & _M32))  # arithmetic shift, then mask: the high word's bits
    key = _mix32(key ^ (step & _M32))
    spread = _mul32(vocab_ids & _M32, 0x85EBCA77)
    return _mix32((key[:, None] + spread[None, :]) & _M32)


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[b, v] in the open interval (0, 1), fp32: 23 hash bits + 1/2, every value exact in fp32."""
    vocab_ids = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    bits = counter_hash(seed, step, vocab_ids) >> 9
    return (bits.to(torch.float32) + 0.5) * (2.0 ** -23)


# ---- logits processing ----

def apply_penalty(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor per row: over the set of seen ids, logit < 0 ? logit * p : logit / p."""
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    seen[t.penalty_rows, t.penalty_ids] = True
    penalized = torch.where(logits < 0, logits * t.penalty, logits / t.penalty)
    return torch.where(seen, penalized, logits)


def apply_warpers(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """HF TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper per row; removed logits = -inf."""
    x = logits / t.temperature
    vocab_size = x.shape[-1]
    k = torch.where(t.top_k > 0, t.top_k.clamp(max=vocab_size), vocab_size)  # [B]
    if t.any_top_p:
        # HF's own route: ascending sort, cut the mass <= 1 - top_p from the bottom, keep the top token.
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        remove = torch.zeros_like(sorted_x, dtype=torch.bool)
        if t.any_top_k:
            kth = sorted_x.gather(1, (vocab_size - k)[:, None])
            remove = sorted_x < kth  # ties with the k-th value stay, as in HF
            sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = remove | (cumulative <= t.top_p_cut)
        remove[:, -1] = False
        return x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if t.any_top_k:
        top = torch.topk(x, min(t.max_top_k, vocab_size), dim=-1).values  # sorted, largest first
        kth = torch.where(t.top_k > 0, top.gather(1, (k.clamp(max=top.shape[1]) - 1)[:, None]).squeeze(1),
                          float("-inf"))
        return x.masked_fill(x < kth[:, None], float("-inf"))
    return x


def process_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Penalty then warpers: the scores a sampled row draws from (softmax of them = its distribution)."""
    x = logits.float()
    if t.any_penalty:
        x = apply_penalty(x, t)
    return apply_warpers(x, t)


def sample(logits: torch.Tensor, t: SamplingTensors) -> SampleOutput:
    """logits: [B, V] -> one token per row, with raw-distribution logprobs; no host sync."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    x = apply_penalty(logits, t) if t.any_penalty else logits
    if t.all_greedy:
        token_ids = x.argmax(dim=-1)
    else:
        scores = apply_warpers(x, t)
        # Exponential race: argmax p_v / E_v with E_v = -log u_v ~ Exp(1) picks v with probability p_v;
        # in log space softmax's normalizer is a per-row constant, so the scores need no softmax.
        u = hash_uniform(t.seed, t.step, scores.shape[-1])
        token_ids = (scores - torch.log(-torch.log(u))).argmax(dim=-1)
        if t.any_greedy:
            token_ids = torch.where(t.greedy, x.argmax(dim=-1), token_ids)
    logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    top_ids = top_logprobs = None
    if t.max_logprobs > 0:
        top_logprobs, top_ids = torch.topk(raw_logprobs, min(t.max_logprobs, logits.shape[-1]), dim=-1)
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
