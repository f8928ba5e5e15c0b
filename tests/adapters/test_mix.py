"""TIES / DARE derived adapters against peft.utils.merge_utils, on small random adapters, on CPU."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from peft.utils import merge_utils

from loraplex.server.adapters import mix
from loraplex.server.adapters.mix import (derive_adapter, low_rank, merge_deltas, mix_key, module_generator,
                                          task_delta)
from loraplex.server.adapters.types import AdapterWeights, ModuleLoRA
from loraplex.server.errors import InvalidArgument
from loraplex.server.types import MergeMethod

OUT, IN = 48, 32
TIES, DARE_LINEAR, DARE_TIES = MergeMethod.TIES, MergeMethod.DARE_LINEAR, MergeMethod.DARE_TIES
WEIGHTS = [0.7, -0.4, 1.3]


def make_adapter(name: str, rank: int, keys: list[tuple[int, str]], seed: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {key: ModuleLoRA(a=torch.randn(rank, IN, generator=gen), b=torch.randn(OUT, rank, generator=gen),
                               scale=16 / rank) for key in keys}
    return AdapterWeights(name=name, modules=modules, sha256=f"sha-{name}")


@pytest.fixture(scope="module")
def adapters() -> list[AdapterWeights]:
    """Ranks 2 / 4 / 8 over different module sets: only (0, q_proj) is in all three."""
    return [make_adapter("a", 2, [(0, "q_proj"), (0, "v_proj"), (1, "q_proj")], 1),
            make_adapter("b", 4, [(0, "q_proj"), (1, "q_proj"), (1, "down_proj")], 2),
            make_adapter("c", 8, [(0, "q_proj"), (0, "v_proj")], 3)]


def deltas_of(adapters, key) -> list[torch.Tensor]:
    return [task_delta(a.modules[key]) if key in a.modules else torch.zeros(OUT, IN) for a in adapters]


def peft_merge(fn, deltas, density, **kw):
    with warnings.catch_warnings():  # peft warns that density 1 prunes nothing
        warnings.simplefilter("ignore")
        return fn(list(deltas), torch.tensor(WEIGHTS), density, **kw)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("key", [(0, "q_proj"), (1, "q_proj")])
def test_ties_equals_peft(adapters, key, density):
    deltas = deltas_of(adapters, key)  # (1, q_proj): adapter c contributes a zero delta
    ours = merge_deltas(deltas, WEIGHTS, TIES, density)
    theirs = peft_merge(merge_utils.ties, deltas, density, majority_sign_method="total")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, merge_utils.task_arithmetic(deltas, torch.tensor(WEIGHTS)))


def test_ties_trim_with_tied_magnitudes_keeps_exactly_k():
    d = torch.tensor([[3.0, -3.0, 3.0, 1.0], [-3.0, 0.5, 0.0, 2.0]])
    ours = merge_deltas([d], [1.0], TIES, 0.25)  # k = 2 of four values tied at 3: the first two in row-major order
    assert ours.tolist() == [[3.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    many_ties = torch.randint(-5, 6, (OUT, IN), generator=torch.Generator().manual_seed(0)).float()
    for density in (0.1, 0.3, 0.5):
        ours = merge_deltas([many_ties], [1.0], TIES, density)
        theirs = merge_utils.ties([many_ties], torch.tensor([1.0]), density)
        assert int((ours != 0).sum()) == int((theirs != 0).sum()) == int(density * OUT * IN)
        assert torch.equal(ours.abs().flatten().sort().values, theirs.abs().flatten().sort().values)


@pytest.mark.parametrize("method", [TIES, DARE_TIES])
def test_sign_election_tie_goes_to_plus(method):
    deltas = [torch.tensor([[1.0, -2.0]]), torch.tensor([[-1.0, 2.0]])]  # signed sums are exactly 0
    ours = merge_deltas(deltas, [1.0, 3.0], method, 1.0)
    assert ours.tolist() == [[1.0, 6.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours, merge_utils.ties(deltas, torch.tensor([1.0, 3.0]), 1.0))


@pytest.mark.parametrize("method,peft_fn", [(DARE_LINEAR, merge_utils.dare_linear),
                                            (DARE_TIES, merge_utils.dare_ties)])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_on_the_same_random_stream(adapters, method, peft_fn, density):
    """peft draws from the global RNG; given a generator in the same state we must draw the same masks."""
    deltas = deltas_of(adapters, (0, "q_proj"))
    ours = merge_deltas(deltas, WEIGHTS, method, density, torch.Generator().manual_seed(1234))
    rng_state = torch.get_rng_state()
    torch.manual_seed(1234)
    theirs = peft_merge(peft_fn, deltas, density)
    torch.set_rng_state(rng_state)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_dare_is_seeded_and_per_module(adapters):
    deltas = deltas_of(adapters, (0, "q_proj"))

    def dare(seed, layer=0, module="q_proj"):
        return merge_deltas(deltas, WEIGHTS, DARE_LINEAR, 0.5, module_generator(seed, layer, module, "drop", "cpu"))

    assert torch.equal(dare(7), dare(7))
    assert not torch.equal(dare(7), dare(8))
    assert not torch.equal(dare(7), dare(7, module="v_proj"))  # same tensors, another module: another stream
    assert not torch.equal(dare(7), dare(7, layer=1))


def test_dare_density_one_is_the_weighted_sum(adapters):
    deltas = deltas_of(adapters, (0, "q_proj"))
    weighted_sum = sum(w * d for w, d in zip(WEIGHTS, deltas))
    for method in (DARE_LINEAR,):
        torch.testing.assert_close(merge_deltas(deltas, WEIGHTS, method, 1.0), weighted_sum)
    # DARE_TIES at density 1 drops nothing and is deterministic: exactly peft's ties and dare_ties.
    ours = merge_deltas(deltas, WEIGHTS, DARE_TIES, 1.0)
    torch.testing.assert_close(ours, peft_merge(merge_utils.ties, deltas, 1.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, peft_merge(merge_utils.dare_ties, deltas, 1.0), rtol=1e-6, atol=1e-6)


def test_dare_mean_over_seeds_approaches_the_weighted_sum(adapters):
    deltas = deltas_of(adapters, (0, "q_proj"))
    weighted_sum = sum(w * d for w, d in zip(WEIGHTS, deltas))
    draws = [merge_deltas(deltas, WEIGHTS, DARE_LINEAR, 0.5, torch.Generator().manual_seed(s)) for s in range(400)]
    one_error = float((draws[0] - weighted_sum).norm() / weighted_sum.norm())
    mean_error = float((torch.stack(draws).mean(0) - weighted_sum).norm() / weighted_sum.norm())
    assert one_error > 0.5  # one draw is far off (keep-probability 1/2) ...
    assert mean_error < 0.1  # ... but unbiased: ~ one_error / sqrt(400)


def test_merge_never_touches_the_global_rng(adapters):
    state = torch.get_rng_state()
    derive_adapter(adapters, WEIGHTS, DARE_TIES, 0.5, 3, 8, name="m")
    assert torch.equal(torch.get_rng_state(), state)


def test_exact_when_ranks_fit(adapters):
    """A linear merge (DARE_LINEAR, density 1) has rank <= 2 + 4 + 8 <= max_rank: B'A' is the merge."""
    derived, report = derive_adapter(adapters, WEIGHTS, DARE_LINEAR, 1.0, 0, 16, name="exact", key="k1")
    assert report.max_rel_error < 1e-5 and report.mean_rel_error < 1e-5
    assert set(derived.modules) == {(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "down_proj")}
    true_ranks = {(0, "q_proj"): 14, (0, "v_proj"): 10, (1, "q_proj"): 6, (1, "down_proj"): 4}
    for key, m in derived.modules.items():
        assert m.rank == true_ranks[key] and m.scale == 1.0
        assert m.a.dtype == m.b.dtype == torch.float32 and m.a.shape == (m.rank, IN) and m.b.shape == (OUT, m.rank)
        merged = sum(w * d for w, d in zip(WEIGHTS, deltas_of(adapters, key)))
        torch.testing.assert_close(m.b @ m.a, merged, rtol=1e-5, atol=1e-4)
    assert report.rank == derived.rank == 14 and report.num_modules == 4
    assert derived.name == "exact" and derived.sha256 == "k1"
    assert derived.config["mix"]["parts"][2] == {"name": "c", "sha256": "sha-c", "weight": 1.3}


@pytest.mark.parametrize("method", [TIES, DARE_TIES])
def test_reported_error_is_the_measured_one(adapters, method):
    derived, report = derive_adapter(adapters, WEIGHTS, method, 0.5, 5, 4, name="lossy")
    errors = []
    for (layer, module), m in derived.modules.items():
        merged = merge_deltas(deltas_of(adapters, (layer, module)), WEIGHTS, method, 0.5,
                              module_generator(5, layer, module, "drop", "cpu"))
        errors.append(float((merged - m.b @ m.a).norm() / merged.norm()))
        s = torch.linalg.svdvals(merged)  # Eckart-Young: the best rank-4 error
        assert errors[-1] == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-4)
    assert report.rank == 4 and report.max_rel_error > 0.05
    assert report.max_rel_error == pytest.approx(max(errors), rel=1e-5)
    assert report.mean_rel_error == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def test_randomized_svd_exact_at_low_rank_and_near_optimal(monkeypatch, adapters):
    monkeypatch.setattr(mix, "FULL_SVD_MAX_DIM", 8)
    monkeypatch.setattr(mix, "OVERSAMPLE", 4)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    low = sum(w * d for w, d in zip(WEIGHTS, deltas_of(adapters, (0, "q_proj"))))  # rank 14
    b, a = low_rank(low, 16, gen())
    assert a.shape[0] == 14
    torch.testing.assert_close(b @ a, low, rtol=1e-5, atol=1e-4)
    full = merge_deltas(deltas_of(adapters, (0, "q_proj")), WEIGHTS, TIES, 0.5)  # full rank 32
    b, a = low_rank(full, 8, gen())
    b2, a2 = low_rank(full, 8, gen())
    assert torch.equal(b, b2) and torch.equal(a, a2)
    s = torch.linalg.svdvals(full)
    optimal = float(s[8:].norm() / s.norm())
    assert optimal < float((full - b @ a).norm() / full.norm()) < optimal * 1.02


def test_all_zero_merge_gives_rank_one_zeros():
    b, a = low_rank(torch.zeros(OUT, IN), 4, torch.Generator())
    assert a.shape == (1, IN) and b.shape == (OUT, 1) and not b.any()


def test_mix_key_stable_and_sensitive():
    base = dict(parts=[("a", "1:aa"), ("b", "2:bb")], weights=[0.5, 0.5], method=TIES, density=0.5, seed=0, rank=16)
    key = mix_key(**base)
    assert key == mix_key(**{**base, "parts": [("a", "1:aa"), ("b", "2:bb")], "weights": [0.5, 0.5]})
    assert re.fullmatch(r"[0-9a-f]{64}", key), key
    changes = [{"parts": [("a", "1:aa"), ("b", "3:bb")]}, {"parts": [("a", "1:aa"), ("c", "2:bb")]},
               {"parts": [("b", "2:bb"), ("a", "1:aa")]}, {"weights": [0.5, 0.6]}, {"method": DARE_TIES},
               {"density": 0.4}, {"seed": 1}, {"rank": 8}]
    keys = {mix_key(**{**base, **change}) for change in changes}
    assert len(keys) == len(changes) and key not in keys


@pytest.mark.parametrize("change,field", [
    ({"adapters": []}, "adapters"),
    ({"adapters": [AdapterWeights(name="empty", modules={})], "weights": [1.0]}, "adapters"),
    ({"weights": [1.0, 1.0]}, "adapters"),
    ({"weights": [1.0, math.nan, 1.0]}, "adapters[1].weight"),
    ({"weights": [1.0, 1.0, -math.inf]}, "adapters[2].weight"),
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": math.nan}, "density"),
    ({"method": MergeMethod.LINEAR}, "merge_method"),
    ({"seed": -1}, "merge_seed"),
    ({"max_rank": 0}, "max_rank"),
])
def test_bad_input_names_the_field(adapters, change, field):
    args = dict(adapters=adapters, weights=WEIGHTS, method=TIES, density=0.5, seed=0, max_rank=8, name="x")
    with pytest.raises(InvalidArgument) as info:
        derive_adapter(**{**args, **change})
    assert info.value.field == field and field.split("[")[0] in info.value.message


def test_mismatched_module_shapes_are_refused(adapters):
    odd = AdapterWeights(name="odd", modules={(0, "q_proj"): ModuleLoRA(torch.zeros(2, IN + 1), torch.zeros(OUT, 2),
                                                                        1.0)})
    with pytest.raises(InvalidArgument) as info:
        derive_adapter([adapters[0], odd], [1.0, 1.0], TIES, 0.5, 0, 8, name="x")
    message = info.value.message
    assert info.value.field == "adapters" and "q_proj" in message and "'odd'" in message and str(IN + 1) in message


@pytest.mark.gpu
def test_cuda_build(monkeypatch, adapters):
    """TIES is deterministic: CUDA agrees with CPU. DARE draws another (Philox) stream on CUDA, seeded all the same."""
    cpu, _ = derive_adapter(adapters, WEIGHTS, TIES, 0.5, 0, 32, name="t")
    cuda, report = derive_adapter(adapters, WEIGHTS, TIES, 0.5, 0, 32, name="t", device="cuda")
    assert report.max_rel_error < 1e-4
    for key, m in cpu.modules.items():
        merged = m.b @ m.a
        assert float((cuda.modules[key].b @ cuda.modules[key].a - merged).norm() / merged.norm()) < 1e-3
    monkeypatch.setattr(mix, "FULL_SVD_MAX_DIM", 8)  # the randomized SVD, as for 8B shapes
    first, report = derive_adapter(adapters, WEIGHTS, DARE_TIES, 0.5, 1, 8, name="d", device="cuda")
    again, _ = derive_adapter(adapters, WEIGHTS, DARE_TIES, 0.5, 1, 8, name="d", device="cuda")
    other, _ = derive_adapter(adapters, WEIGHTS, DARE_TIES, 0.5, 2, 8, name="d", device="cuda")
    key = (0, "q_proj")
    assert first.modules[key].a.device.type == "cpu" and 0 < report.max_rel_error < 1
    assert torch.equal(first.modules[key].b, again.modules[key].b)
    assert not torch.equal(first.modules[key].b, other.modules[key].b)
