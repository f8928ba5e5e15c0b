"""The per-token LoRA oracle (`lora.reference`: gather + einsum, the reference the grouped twin and the
Triton kernels are checked against) against a per-token loop in float64 (the ground truth).

Matrix: dtypes x ranks (1..128, mixed) x adapter popularity (distinct, identical, uniform, zipf, skewed)
x odd token counts x base rows x weighted mixes (several (slot, weight) pairs per token).
"""
from __future__ import annotations

import pytest
import torch

from loraplex.server.lora import reference

# Relative error ||out - ref|| / ||ref|| allowed per compute dtype (the reference is float64).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def truth(x, lora_a, lora_b, pairs_per_token):
    """Per-token Python loop in float64: out[t] = sum_k w * B[s] @ A[s] @ x[t]."""
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float64)
    for t, pairs in enumerate(pairs_per_token):
        for slot, weight in pairs:
            out[t] += weight * (lora_b[slot].double() @ (lora_a[slot].double() @ x[t].double()))
    return out


def make_stacks(num_slots, max_rank, n_in, n_out, ranks, dtype, device, gen):
    """Random slot stacks where slot s holds an adapter of rank ranks[s] (zero padding beyond)."""
    a = torch.zeros(num_slots, max_rank, n_in, dtype=dtype, device=device)
    b_by_out = torch.zeros(n_out, num_slots, max_rank, dtype=dtype, device=device)
    for s, r in enumerate(ranks):
        a[s, :r] = (torch.randn(r, n_in, generator=gen) / n_in ** 0.5).to(device, dtype)
        b_by_out[:, s, :r] = (torch.randn(n_out, r, generator=gen) / r ** 0.5).to(device, dtype)
    return a, b_by_out


def popularity(kind: str, num_seqs: int, num_slots: int, gen) -> list[int]:
    """Slot of each sequence (-1 = base model)."""
    if kind == "distinct":
        return [i % num_slots for i in range(num_seqs)]
    if kind == "identical":
        return [3 % num_slots] * num_seqs
    if kind == "uniform":
        return torch.randint(-1, num_slots, (num_seqs,), generator=gen).tolist()
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64)
        return torch.multinomial(weights, num_seqs, replacement=True, generator=gen).tolist()
    if kind == "skewed":  # one sequence on a rare adapter, the rest on one popular adapter or base
        return [num_slots - 1] + [0 if i % 3 else -1 for i in range(num_seqs - 1)]
    raise ValueError(kind)


def run_case(num_tokens_per_seq, seq_slots, ranks, n_in, n_out, dtype, device, mix_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_slots, max_rank = len(ranks), max(ranks)
    a, b_by_out = make_stacks(num_slots, max_rank, n_in, n_out, ranks, dtype, device, gen)
    lora_b = b_by_out.permute(1, 0, 2)
    seq_pairs = []
    for i, slot in enumerate(seq_slots):
        if slot < 0:
            seq_pairs.append(())
        elif mix_every and i % mix_every == 0:  # an exact weighted mix of up to 3 adapters
            others = [(slot + 1 + j) % num_slots for j in range(2)]
            seq_pairs.append(tuple(zip([slot, *others], [0.7, -0.4, 1.3])))
        else:
            seq_pairs.append(((slot, 1.0),))
    num_tokens = sum(num_tokens_per_seq)
    x = torch.randn(num_tokens, n_in, generator=gen).to(device, dtype)
    base = torch.randn(num_tokens, n_out, generator=gen).to(device, dtype)
    pairs_per_token = [p for p, n in zip(seq_pairs, num_tokens_per_seq) for _ in range(n)]
    expected = base.double().cpu() + truth(x.cpu(), a.cpu(), lora_b.cpu(), pairs_per_token)
    slot_ids, weights = token_pairs(pairs_per_token, device)
    out = reference.add_lora_gather(base.clone(), x, a, lora_b, slot_ids, weights)
    return out.double().cpu(), expected


def token_pairs(pairs_per_token, device):
    """[T, K] slot ids (-1 padded) and fp32 weights, the oracle's per-token form."""
    most = max(1, max(len(p) for p in pairs_per_token))
    slot_ids = torch.full((len(pairs_per_token), most), -1, dtype=torch.int64)
    weights = torch.zeros(len(pairs_per_token), most, dtype=torch.float32)
    for t, pairs in enumerate(pairs_per_token):
        for k, (slot, weight) in enumerate(pairs):
            slot_ids[t, k], weights[t, k] = slot, weight
    return slot_ids.to(device), weights.to(device)


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["distinct", "identical", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("num_seqs", [1, 3, 7, 33])
def test_popularity_and_odd_batches_fp32(kind, num_seqs):
    gen = torch.Generator().manual_seed(num_seqs)
    ranks = [8, 1, 16, 4, 64, 2, 32, 128]
    slots = popularity(kind, num_seqs, len(ranks), gen)
    tokens = [1 + (i * 5) % 9 for i in range(num_seqs)]  # a mix of decode (1) and prefill chunks
    out, ref = run_case(tokens, slots, ranks, 96, 80, torch.float32, "cpu")
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_mixes_and_base_rows(dtype):
    gen = torch.Generator().manual_seed(1)
    slots = popularity("uniform", 17, 6, gen)
    slots[0], slots[5] = -1, -1
    out, ref = run_case([1] * 10 + [5] * 7, slots, [4, 8, 16, 2, 8, 1], 576, 192, dtype, "cpu",
                        mix_every=2)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_base_rows_untouched():
    """Tokens of base-model sequences get exactly nothing added, bit for bit."""
    slots = [-1, 2, -1, 0]
    gen = torch.Generator().manual_seed(2)
    a, b_by_out = make_stacks(4, 16, 32, 24, [16, 8, 4, 2], torch.float32, "cpu", gen)
    x = torch.randn(4, 32, generator=gen)
    base = torch.randn(4, 24, generator=gen)
    slot_ids, weights = token_pairs([() if s < 0 else ((s, 1.0),) for s in slots], "cpu")
    out = reference.add_lora_gather(base.clone(), x, a, b_by_out.permute(1, 0, 2), slot_ids, weights)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.equal(out[1], base[1])


def test_rank_padding_leaves_product_unchanged():
    """An adapter padded with zeros to the slot rank computes the same delta as unpadded."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    a_pad = torch.zeros(1, 64, 40, dtype=torch.float64)
    b_pad = torch.zeros(30, 1, 64, dtype=torch.float64)
    a_pad[0, :5], b_pad[:, 0, :5] = a, b
    slot_ids, weights = token_pairs([((0, 1.0),)] * 9, "cpu")
    out = reference.add_lora_gather(torch.zeros(9, 30, dtype=torch.float64), x, a_pad, b_pad.permute(1, 0, 2),
                                    slot_ids, weights)
    unpadded = reference.add_lora_gather(torch.zeros(9, 30, dtype=torch.float64), x, a[None], b[None],
                                         slot_ids, weights)
    torch.testing.assert_close(out, unpadded, rtol=1e-5, atol=1e-5)  # zero rows add nothing (fp32 sums)
    torch.testing.assert_close(out, x @ a.t() @ b.t(), rtol=1e-5, atol=1e-5)  # the oracle sums in fp32
