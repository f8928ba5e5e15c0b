"""The batched sampler against transformers' own logits processors, and its counter-based randomness."""
from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from loraplex.server.engine.sampler import (RowSampling, apply_penalty, build_sampling_tensors, counter_hash,
                                            hash_uniform, process_logits, sample, seed_to_int64)

M32 = 0xFFFFFFFF


def hf_process(logits_row: torch.Tensor, row: RowSampling) -> torch.Tensor:
    """HF generate's processor chain for one row: [V] -> [V]."""
    x = logits_row[None].clone()
    ids = torch.tensor([list(row.penalty_token_ids)], dtype=torch.int64)
    if row.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)(ids, x)
    x = TemperatureLogitsWarper(row.temperature)(ids, x)
    if row.top_k > 0:
        x = TopKLogitsWarper(row.top_k)(ids, x)
    if row.top_p < 1.0:
        x = TopPLogitsWarper(row.top_p)(ids, x)
    return x[0]


def random_logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def penalty_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]  # duplicates on purpose: HF penalizes a set


# Sampled rows of every kind; mixed in one batch with greedy rows below.
ROW_CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=1),
    dict(temperature=1.3, top_k=20),
    dict(temperature=1.0, top_k=5000),  # larger than the vocab: HF clamps
    dict(temperature=0.5, top_p=0.9),
    dict(temperature=1.0, top_p=0.3),
    dict(temperature=2.0, top_p=0.05),
    dict(temperature=0.8, top_k=40, top_p=0.8),
    dict(temperature=1.0, top_k=3, top_p=0.99, repetition_penalty=1.3),
    dict(temperature=0.9, top_p=0.6, repetition_penalty=0.8),
    dict(temperature=1.1, repetition_penalty=2.0),
    dict(temperature=1.0, top_p=1e-9),  # 1 - top_p rounds to 1 in fp32: only "keep at least one" saves a token
]


def mixed_rows(vocab: int, with_greedy: bool = True) -> list[RowSampling]:
    rng = random.Random(0)
    rows = []
    for i, cfg in enumerate(ROW_CONFIGS):
        ids = penalty_ids(rng, vocab, 3 + 17 * i) if cfg.get("repetition_penalty", 1.0) != 1.0 else ()
        rows.append(RowSampling(seed=rng.getrandbits(64), step=i, penalty_token_ids=ids, num_logprobs=i % 4, **cfg))
        if with_greedy and i % 3 == 0:
            rows.append(RowSampling(temperature=0.0, top_k=7, top_p=0.5, repetition_penalty=1.5 if i else 1.0,
                                    penalty_token_ids=penalty_ids(rng, vocab, 9) if i else (), seed=i, step=i))
    return rows


def test_all_greedy_is_argmax_and_skips_warpers():
    logits = random_logits(9, 1000, seed=1)
    rows = [RowSampling(temperature=0.0, top_k=5, top_p=0.5, seed=i, step=i) for i in range(9)]
    t = build_sampling_tensors(rows, "cpu")
    assert t.all_greedy and not t.any_top_k and not t.any_top_p and not t.any_penalty and t.max_logprobs == 0
    out = sample(logits, t)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.top_ids is None and out.top_logprobs is None


def test_repetition_penalty_matches_hf():
    vocab = 500
    logits = random_logits(4, vocab, seed=2)
    rng = random.Random(2)
    rows = [RowSampling(temperature=0.0, repetition_penalty=p, penalty_token_ids=penalty_ids(rng, vocab, n))
            for p, n in [(1.3, 40), (0.7, 5), (2.0, 300), (1.0, 0)]]
    t = build_sampling_tensors(rows, "cpu")
    ours = apply_penalty(logits, t)
    for b, row in enumerate(rows):
        expected = logits[b:b + 1].clone()
        if row.repetition_penalty != 1.0:
            ids = torch.tensor([list(row.penalty_token_ids)])
            expected = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)(ids, expected)
        assert torch.equal(ours[b], expected[0]), b
    assert not torch.equal(ours[0], logits[0])  # the test can see a penalty
    # Greedy picks the argmax of the penalized logits: make that differ from the raw argmax.
    top = int(logits[0].argmax())
    rows[0] = RowSampling(temperature=0.0, repetition_penalty=100.0, penalty_token_ids=[top])
    out = sample(logits, build_sampling_tensors(rows, "cpu"))
    assert int(out.token_ids[0]) != top
    assert int(out.token_ids[0]) == int(apply_penalty(logits, build_sampling_tensors(rows, "cpu"))[0].argmax())


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_warpers_match_hf_per_row_in_a_mixed_batch(scale):
    vocab = 800
    rows = mixed_rows(vocab, with_greedy=False)
    logits = random_logits(len(rows), vocab, seed=int(scale * 10), scale=scale)
    ours = process_logits(logits, build_sampling_tensors(rows, "cpu"))
    for b, row in enumerate(rows):
        expected = hf_process(logits[b], row)
        kept, kept_hf = torch.isfinite(ours[b]), torch.isfinite(expected)
        assert torch.equal(kept, kept_hf), (b, ROW_CONFIGS[b], int(kept.sum()), int(kept_hf.sum()))
        assert torch.equal(ours[b][kept], expected[kept_hf]), b
    # Guard: the configs really do cut something (top_k=1 keeps one; top_p=0.05 keeps few).
    assert int(torch.isfinite(ours[1]).sum()) == 1
    assert 0 < int(torch.isfinite(ours[6]).sum()) < vocab
    assert int(torch.isfinite(ours[-1]).sum()) == 1


def test_each_row_of_a_mixed_batch_equals_that_row_alone():
    vocab = 600
    rows = mixed_rows(vocab)
    logits = random_logits(len(rows), vocab, seed=3)
    batch_t = build_sampling_tensors(rows, "cpu")
    assert batch_t.any_greedy and not batch_t.all_greedy and batch_t.any_top_k and batch_t.any_top_p
    out = sample(logits, batch_t)
    processed = process_logits(logits, batch_t)
    for b, row in enumerate(rows):
        alone_t = build_sampling_tensors([row], "cpu")
        alone = sample(logits[b:b + 1], alone_t)
        assert int(out.token_ids[b]) == int(alone.token_ids[0]), b
        assert torch.equal(out.logprobs[b:b + 1], alone.logprobs)
        if row.temperature == 0:
            penalized = apply_penalty(logits[b:b + 1], alone_t) if row.repetition_penalty != 1 else logits[b:b + 1]
            assert int(out.token_ids[b]) == int(penalized.argmax())
        else:
            assert torch.equal(processed[b], process_logits(logits[b:b + 1], alone_t)[0])
            assert math.isfinite(float(processed[b, out.token_ids[b]]))  # never an excluded token


def test_seeded_draw_ignores_batch_size_and_position():
    vocab = 1000
    target = RowSampling(temperature=1.0, top_p=0.95, seed=2**64 - 12345, step=17)
    target_logits = random_logits(1, vocab, seed=4, scale=1.0)
    expected = int(sample(target_logits, build_sampling_tensors([target], "cpu")).token_ids[0])
    rng = random.Random(4)
    for batch, pos in [(2, 0), (2, 1), (7, 3), (33, 32)]:
        others = [RowSampling(temperature=rng.choice([0.0, 0.5, 1.0]), top_k=rng.choice([0, 10]),
                              seed=rng.getrandbits(64), step=rng.randrange(100)) for _ in range(batch - 1)]
        rows = others[:pos] + [target] + others[pos:]
        logits = random_logits(batch, vocab, seed=batch, scale=1.0)
        logits[pos] = target_logits[0]
        assert int(sample(logits, build_sampling_tensors(rows, "cpu")).token_ids[pos]) == expected


def test_different_seeds_and_steps_draw_differently():
    vocab, steps = 1000, 64
    logits = random_logits(1, vocab, seed=5, scale=0.5).expand(steps, vocab)

    def draws(seed, step0=0):
        rows = [RowSampling(temperature=1.0, seed=seed, step=step0 + s) for s in range(steps)]
        return sample(logits, build_sampling_tensors(rows, "cpu")).token_ids

    a, b = draws(1), draws(2)
    assert torch.equal(a, draws(1))
    # Near-uniform over 1000 tokens: two independent streams agree ~0.1% of the time.
    assert int((a == b).sum()) <= 4
    assert int((a == draws(2**63 + 1)).sum()) <= 4  # the seed's high word matters
    assert int((a[1:] == draws(1, step0=1)[:-1]).all())  # the step is the counter: shifting it shifts the stream
    assert len(set(a.tolist())) > steps * 0.8


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test: P(chi2_{k-1} >= stat), from the regularized upper incomplete gamma function."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)


@pytest.mark.parametrize("case", [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.5, top_p=0.7),
    dict(temperature=1.0, top_k=4, top_p=0.8, repetition_penalty=1.4, penalty_token_ids=(0, 5)),
])
@pytest.mark.parametrize("vary", ["step", "seed"])
def test_draws_follow_the_processed_distribution(case, vary):
    """20,000 draws; the kept tokens' frequencies pass Pearson's chi-square at p > 1e-4, the others never occur.

    Draws are deterministic (seeded hash), so this cannot flake: a correct sampler passes for these seeds
    with probability 1 - 1e-4 a priori; a biased one (e.g. race with u in [0,1) or a correlated hash) fails.
    Max abs frequency error < 0.015 (> 4 sigma at n=20,000, p=0.4: sigma = 0.0035) is checked too.
    """
    n, vocab = 20_000, len(PROBS)
    logits = PROBS.log().float()[None].expand(n, vocab)
    if vary == "step":
        rows = [RowSampling(seed=987654321, step=s, **case) for s in range(n)]
    else:  # consecutive and high-bit seeds, one step
        rows = [RowSampling(seed=(2**63 + s) if s % 2 else s, step=3, **case) for s in range(n)]
    tokens = sample(logits, build_sampling_tensors(rows, "cpu")).token_ids
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = hf_process(logits[0], rows[0]).double().softmax(-1)  # HF's own processed distribution
    kept = expected > 0
    assert counts[~kept].sum() == 0
    assert chi_square_pvalue(counts[kept], expected[kept]) > 1e-4
    assert float((counts / n - expected).abs().max()) < 0.015
    if vary == "step" and case == dict(temperature=1.0):
        # Consecutive steps of one sequence are independent: pairs follow p_i * p_j (35 dof).
        pair_counts = torch.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab).double()
        assert chi_square_pvalue(pair_counts, torch.outer(PROBS, PROBS).flatten()) > 1e-4


def test_logprobs_are_raw_log_softmax_and_top_sorted():
    vocab = 400
    rows = mixed_rows(vocab)
    logits = random_logits(len(rows), vocab, seed=6)
    t = build_sampling_tensors(rows, "cpu")
    assert t.max_logprobs == 3
    out = sample(logits, t)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0], atol=0, rtol=0)
    assert out.top_ids.shape == out.top_logprobs.shape == (len(rows), 3)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_logprobs, raw.gather(1, out.top_ids))
    assert torch.equal(out.top_logprobs, raw.topk(3, -1).values)
    # A sampled token need not be the top one: with temperature 2 some draws fall outside the top 3.
    hot = [RowSampling(temperature=2.0, seed=7, step=s, num_logprobs=2) for s in range(50)]
    hot_out = sample(logits[:1].expand(50, vocab), build_sampling_tensors(hot, "cpu"))
    assert not torch.isin(hot_out.token_ids, hot_out.top_ids[0]).all()
    assert torch.equal(hot_out.logprobs, raw[0, hot_out.token_ids])


def ref_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_hash(seed_u64: int, step: int, v: int) -> int:
    """The hash in plain unbounded Python ints on the uint64 seed: the spec the tensor version must meet."""
    key = ref_mix32((seed_u64 & M32) ^ 0x9E3779B9)
    key = ref_mix32(key ^ (seed_u64 >> 32))
    key = ref_mix32(key ^ (step & M32))
    return ref_mix32((key + v * 0x85EBCA77) & M32)


SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 12345, 2**64 - 2**32, 2**64 - 1, 0xDEADBEEFCAFEF00D]


def test_hash_matches_python_reference_including_high_bit_seeds():
    steps = [0, 1, 7, 2**31 + 5, 2**32 - 1]
    vocab_ids = torch.tensor(list(range(40)) + [49151, 128255, 2**31 - 1])
    seeds = [s for s in SEEDS for _ in steps]
    seed_t = torch.tensor([seed_to_int64(s) for s in seeds])
    assert seed_t.dtype == torch.int64 and int(seed_t[SEEDS.index(2**64 - 1) * len(steps)]) == -1
    step_t = torch.tensor(steps * len(SEEDS))
    ours = counter_hash(seed_t, step_t, vocab_ids)
    expected = torch.tensor([[ref_hash(s, st, int(v)) for v in vocab_ids] for s, st in zip(seeds, steps * len(SEEDS))])
    assert torch.equal(ours, expected)
    assert ours.min() >= 0 and ours.max() <= M32
    with pytest.raises(AssertionError):
        seed_to_int64(2**64)


def test_uniforms_are_in_the_open_interval_and_flat():
    seeds = torch.tensor([seed_to_int64(s) for s in SEEDS])
    u = hash_uniform(seeds, torch.arange(len(SEEDS)), 50_000)
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    # 500k uniforms: mean 0.5 +- 0.0004 (sigma = 0.29/sqrt(5e5)); each decile holds 10% +- 0.0004.
    assert abs(float(u.double().mean()) - 0.5) < 0.002
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double() / u.numel()
    assert float((deciles - 0.1).abs().max()) < 0.002


def test_seeds_above_2_63_sample():
    logits = random_logits(1, 300, seed=8, scale=0.3).expand(64, 300)
    high = [RowSampling(temperature=1.0, seed=2**64 - 1, step=s) for s in range(64)]
    low_word = [RowSampling(temperature=1.0, seed=M32, step=s) for s in range(64)]
    a = sample(logits, build_sampling_tensors(high, "cpu")).token_ids
    b = sample(logits, build_sampling_tensors(low_word, "cpu")).token_ids
    assert int((a == b).sum()) < 8


@pytest.mark.gpu
def test_cuda_matches_cpu():
    rows = mixed_rows(2000)
    logits = random_logits(len(rows), 2000, seed=9)
    seeds = torch.tensor([seed_to_int64(s) for s in SEEDS])
    steps = torch.arange(len(SEEDS))
    ids = torch.arange(5000)
    assert torch.equal(counter_hash(seeds.cuda(), steps.cuda(), ids.cuda()).cpu(), counter_hash(seeds, steps, ids))
    assert torch.equal(hash_uniform(seeds.cuda(), steps.cuda(), 5000).cpu(), hash_uniform(seeds, steps, 5000))
    cpu = sample(logits, build_sampling_tensors(rows, "cpu"))
    gpu = sample(logits.cuda(), build_sampling_tensors(rows, "cuda"))
    assert torch.equal(gpu.token_ids.cpu(), cpu.token_ids)
    assert torch.allclose(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-5)
