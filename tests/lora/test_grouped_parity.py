"""Grouped LoRA op (stacks + step meta + PyTorch twin) against plain math, the gather oracle and PEFT.

Matrix: popularity (one adapter, a few hot ones, all distinct, weighted mixes of up to 8 pairs,
prefill-like groups) x token counts (1, 3, 7, 133) x ranks 4..128 differing per slice (some
slices unadapted) x base rows interleaved, on SmolLM2's real group shapes. Pools are poisoned with
NaN before adapters are written: a read beyond a slot's rank shows up as NaN.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from loraplex.server.adapters.types import AdapterWeights, ModuleLoRA
from loraplex.server.lora import reference
from loraplex.server.lora.apply import apply_lora, needs_lora
from loraplex.server.lora.grouped_reference import add_lora as twin
from loraplex.server.lora.prepare import prepare_for_device
from loraplex.server.lora.stacks import LoraStacks, ProjectionGroupShape
from loraplex.server.lora.step_meta import LoraMetaBuffers

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
"""||out - truth|| / ||truth - base|| allowed per pool dtype (truth in float64)."""


def smol_groups(layer: int = 0, hidden: int = 576, kv: int = 192, inter: int = 1536) -> list[ProjectionGroupShape]:
    return [ProjectionGroupShape(layer, "qkv", ("q_proj", "k_proj", "v_proj"), hidden, (hidden, kv, kv)),
            ProjectionGroupShape(layer, "o", ("o_proj",), hidden, (hidden,)),
            ProjectionGroupShape(layer, "gate_up", ("gate_proj", "up_proj"), hidden, (inter, inter)),
            ProjectionGroupShape(layer, "down", ("down_proj",), inter, (hidden,))]


def random_adapter(name: str, shapes, ranks: dict[str, int], gen: torch.Generator) -> AdapterWeights:
    """Modules of `ranks` (module name -> rank; absent = not adapted) in every group, random A, B, scale."""
    modules = {}
    for shape in shapes:
        for module, n_out in zip(shape.slices, shape.out_features):
            r = ranks.get(module, 0)
            if r:
                a = torch.randn(r, shape.in_features, generator=gen) / shape.in_features ** 0.5
                b = torch.randn(n_out, r, generator=gen) / r ** 0.5
                scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=gen))
                modules[(shape.layer, module)] = ModuleLoRA(a=a, b=b, scale=scale)
    return AdapterWeights(name=name, modules=modules)


def slot_ranks(slot: int, gen: torch.Generator) -> dict[str, int]:
    """Per-module ranks 4..128 (a rank_pattern), one module left out on every third slot."""
    choices = [4, 8, 16, 32, 64, 128]
    ranks = {m: choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
             for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    if slot % 3 == 2:
        ranks.pop(("k_proj", "o_proj", "up_proj")[slot % 9 // 3])
    return ranks


def build_stacks(shapes, adapters, dtype, max_rank=128, slot_order=None, device="cpu") -> LoraStacks:
    stacks = LoraStacks(shapes, len(adapters), max_rank, dtype, device, slot_order=slot_order)
    for g in stacks.groups.values():
        g.a_pool.fill_(float("nan"))
        g.bt_pool.fill_(float("nan"))
    for slot, adapter in enumerate(adapters):
        if adapter is not None:
            stacks.write(slot, prepare_for_device(adapter, dtype, pin=False))
    return stacks


def popularity(kind: str, num_seqs: int, num_slots: int, gen) -> list[tuple[tuple[int, float], ...]]:
    """Pairs of each sequence; every fourth sequence is a base row except for 'one'."""
    pick = lambda: int(torch.randint(0, num_slots, (1,), generator=gen))  # noqa: E731
    pairs = []
    for i in range(num_seqs):
        if kind != "one" and i % 4 == 1:
            pairs.append(())
        elif kind == "one":
            pairs.append(((3, 1.0),))
        elif kind == "hot":
            pairs.append((((0, 2, 5)[i % 3], 1.0),))
        elif kind == "distinct":
            pairs.append(((i % num_slots, 1.0),))
        elif kind == "mixes":  # up to 8 pairs, repeated slots allowed, negative weights
            k = 1 + i % 8
            pairs.append(tuple((pick(), round(float(torch.randn(1, generator=gen)), 3)) for _ in range(k)))
        else:
            raise ValueError(kind)
    return pairs


def truth(out, x, shape, adapters, seq_pairs, tokens_per_seq):
    """float64 plain math: out[t, slice j] += sum over t's pairs of w * (s B) @ A @ x[t], every slot on every token."""
    expected = out.double().clone()
    weights = torch.zeros(len(seq_pairs), len(adapters), dtype=torch.float64)  # token's weight on each slot
    for i, pairs in enumerate(seq_pairs):
        for slot, w in pairs:
            weights[i, slot] += float(np.float32(w))  # mix weights travel as fp32
    weights = weights.repeat_interleave(torch.tensor(tokens_per_seq), dim=0)
    xs = x.double()
    for module, n0 in zip(shape.slices, shape.slice_offsets):
        for slot, adapter in enumerate(adapters):
            m = None if adapter is None else adapter.modules.get((shape.layer, module))
            if m is not None and weights[:, slot].any():
                scaled_b = (m.b.float() * m.scale).double()  # folded in fp32, as prepare_for_device does
                delta = xs @ m.a.double().t() @ scaled_b.t()
                expected[:, n0:n0 + m.b.shape[0]] += weights[:, slot:slot + 1] * delta
    return expected


@functools.cache
def shared_adapters(num_slots: int = 12) -> list[AdapterWeights]:
    gen = torch.Generator().manual_seed(0)
    return [random_adapter(f"a{s}", smol_groups(), slot_ranks(s, gen), gen) for s in range(num_slots)]


@functools.cache
def shared_stacks(dtype: torch.dtype) -> LoraStacks:
    """Built once per dtype (setup dominates on 2 cores); tests only read them."""
    return build_stacks(smol_groups(), shared_adapters(), dtype)


def run_twin(kind, num_tokens, dtype, group_name="qkv", seed=0):
    gen = torch.Generator().manual_seed(seed)
    adapters, stacks = shared_adapters(), shared_stacks(dtype)
    num_slots = len(adapters)
    if kind == "prefill":  # a few long prompts (one shared adapter) beside decode rows
        tokens = [num_tokens - 5, 1, 1, 1, 1, 1] if num_tokens > 5 else [num_tokens]
        seq_pairs = [((1, 1.0),), (), ((1, 1.0),), ((4, 0.5), (7, 0.5)), (), ((9, 1.0),)][:len(tokens)]
    else:
        tokens = [1] * num_tokens
        seq_pairs = popularity(kind, num_tokens, num_slots, gen)
    group = stacks.group(0, group_name)
    x = torch.randn(sum(tokens), group.shape.in_features, generator=gen).to(dtype)
    base = torch.randn(sum(tokens), sum(group.out_features), generator=gen).to(dtype)
    meta = LoraMetaBuffers(256, 256, 8, "cpu").fill(seq_pairs, tokens)
    out = apply_lora(base.clone(), x, group, meta)
    return out, truth(base, x, group.shape, adapters, seq_pairs, tokens), base, seq_pairs, tokens


def rel_err(out, expected, base):
    return ((out.double() - expected).norm() / (expected - base.double()).norm()).item()


def delta_error(out, reference, base) -> float:
    """||out - reference|| / ||reference - base||, the error of the LoRA delta; when the reference adds
    nothing (a group none of the step's slots adapts) that ratio is 0/0 = NaN, so then: 0 if out is base
    bit for bit, else inf. (The first GPU run flagged "down: nan" for exactly that reason.)"""
    scale = (reference.double() - base.double()).norm().item()
    if scale == 0.0:
        return 0.0 if torch.equal(out, base) else float("inf")
    return (out.double() - reference.double()).norm().item() / scale


@pytest.mark.parametrize("kind", ["one", "hot", "distinct", "mixes", "prefill"])
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 133])
def test_twin_equals_float64_math(kind, num_tokens):
    out, expected, base, seq_pairs, tokens = run_twin(kind, num_tokens, torch.float64, seed=num_tokens)
    if torch.equal(expected, base.double()):
        assert torch.equal(out, base)  # only base rows: nothing written
        return
    assert rel_err(out, expected, base) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("group_name", ["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_twin_in_compute_dtypes(group_name, dtype):
    out, expected, base, _, _ = run_twin("mixes", 133, dtype, group_name, seed=5)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected, base) < TOLERANCE[dtype]


def test_base_rows_untouched_bit_for_bit():
    out, _, base, seq_pairs, tokens = run_twin("distinct", 133, torch.bfloat16, seed=6)
    rows = torch.tensor([i for i, p in enumerate(seq_pairs) if not p])
    assert rows.numel() > 10 and torch.equal(out[rows], base[rows])
    assert not torch.equal(out, base)


def test_twin_matches_gather_oracle():
    """The existing per-token oracle (reference.add_lora_gather) on padded [S, R, in] / [S, out, R] stacks."""
    gen = torch.Generator().manual_seed(7)
    shapes, num_slots, max_rank = smol_groups(), 6, 32
    adapters = [random_adapter(f"a{s}", shapes, {m: (4, 8, 16, 32)[(s + len(m)) % 4] for m in ranks}, gen)
                for s, ranks in enumerate(slot_ranks(s, gen) for s in range(num_slots))]
    stacks = build_stacks(shapes, adapters, torch.float32, max_rank=max_rank)
    seq_pairs = [p[:3] for p in popularity("mixes", 13, num_slots, gen)]
    tokens = [1 + i % 3 for i in range(13)]
    meta = LoraMetaBuffers(128, 64, 8, "cpu").fill(seq_pairs, tokens)
    pairs_of_token = [p for p, n in zip(seq_pairs, tokens) for _ in range(n)]
    slot_ids = torch.full((len(pairs_of_token), 8), -1, dtype=torch.long)
    weights = torch.zeros(len(pairs_of_token), 8)
    for t, pairs in enumerate(pairs_of_token):
        for k, (s, w) in enumerate(pairs):
            slot_ids[t, k], weights[t, k] = s, w
    for group in (stacks.group(0, "qkv"), stacks.group(0, "down")):
        x = torch.randn(len(pairs_of_token), group.shape.in_features, generator=gen)
        base = torch.randn(len(pairs_of_token), sum(group.out_features), generator=gen)
        out = twin(base.clone(), x, group, meta)
        for module, n0, n in zip(group.shape.slices, group.slice_offsets, group.out_features):
            lora_a = torch.zeros(num_slots, max_rank, group.shape.in_features)
            lora_b = torch.zeros(num_slots, n, max_rank)
            for s, adapter in enumerate(adapters):
                m = adapter.modules.get((0, module))
                if m is not None:
                    lora_a[s, :m.rank], lora_b[s, :, :m.rank] = m.a, m.b * m.scale
            expected = reference.add_lora_gather(base[:, n0:n0 + n].clone(), x, lora_a, lora_b, slot_ids, weights)
            torch.testing.assert_close(out[:, n0:n0 + n], expected, rtol=1e-4, atol=1e-4)


def test_mix_equals_rank_concatenated_adapter():
    """Pairs ((s1, w1), (s2, w2)) == one slot holding [w1 s1 B1 | w2 s2 B2] [A1; A2] (never (sum wB)(sum wA))."""
    gen = torch.Generator().manual_seed(8)
    shapes = smol_groups()
    a1 = random_adapter("a1", shapes, {"q_proj": 8, "v_proj": 16, "gate_proj": 4}, gen)
    a2 = random_adapter("a2", shapes, {"q_proj": 32, "k_proj": 4, "gate_proj": 4}, gen)
    cat = {}
    for key in set(a1.modules) | set(a2.modules):
        parts = [(m, w) for m, w in ((a1.modules.get(key), 0.7), (a2.modules.get(key), -1.3)) if m is not None]
        cat[key] = ModuleLoRA(a=torch.cat([m.a for m, _ in parts]),
                              b=torch.cat([m.b * m.scale * w for m, w in parts], 1), scale=1.0)
    stacks = build_stacks(shapes, [a1, a2, AdapterWeights("cat", cat)], torch.float64)
    buffers = LoraMetaBuffers(64, 8, 8, "cpu")
    for name in ("qkv", "gate_up"):
        group = stacks.group(0, name)
        x = torch.randn(5, group.shape.in_features, generator=gen, dtype=torch.float64)
        base = torch.randn(5, sum(group.out_features), generator=gen, dtype=torch.float64)
        mixed = twin(base.clone(), x, group, buffers.fill([((0, 0.7), (1, -1.3))], [5]))
        concatenated = twin(base.clone(), x, group, buffers.fill([((2, 1.0),)], [5]))
        # Both sides fold scales into B in fp32 (prepare_for_device), in different orders: fp32-level agreement.
        torch.testing.assert_close(mixed, concatenated, rtol=1e-6, atol=1e-6)


def test_mix_matches_peft_cat():
    """Our pairs on PEFT's own adapters == PEFT add_weighted_adapter(..., 'cat') (float64)."""
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(48, 40, bias=False, dtype=torch.float64))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  init_lora_weights=False), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=12, lora_alpha=6, use_rslora=True, target_modules=["q_proj"],
                                           init_lora_weights=False))
    peft_model.add_weighted_adapter(["a", "b"], [0.6, -0.9], "mix", combination_type="cat")
    layer = peft_model.base_model.model.q_proj
    x = torch.randn(6, 48, generator=gen, dtype=torch.float64)
    peft_model.set_adapter("mix")
    with torch.no_grad():
        expected = peft_model(x)
    shape = ProjectionGroupShape(0, "q", ("q_proj",), 48, (40,))
    adapters = [AdapterWeights(n, {(0, "q_proj"): ModuleLoRA(layer.lora_A[n].weight.detach(),
                                                             layer.lora_B[n].weight.detach(), layer.scaling[n])})
                for n in ("a", "b")]
    stacks = build_stacks([shape], adapters, torch.float64)
    meta = LoraMetaBuffers(8, 4, 8, "cpu").fill([((0, 0.6), (1, -0.9))], [6])
    out = apply_lora(x @ layer.base_layer.weight.t(), x, stacks.group(0, "q"), meta)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # scale folded into B in fp32


def test_write_clear_and_rewrite_round_trip():
    gen = torch.Generator().manual_seed(10)
    shapes = smol_groups()
    big = random_adapter("big", shapes, {"q_proj": 64, "v_proj": 128, "down_proj": 32}, gen)
    small = random_adapter("small", shapes, {"q_proj": 4, "k_proj": 8}, gen)
    stacks = build_stacks(shapes, [None, big, None], torch.float32, slot_order=[2, 0, 1])
    qkv = stacks.group(0, "qkv")
    row0 = 0 * 128  # slot 1 sits at row block slot_order[1] = 0
    m = big.modules[(0, "v_proj")]
    torch.testing.assert_close(qkv.a_pool[2, row0:row0 + 128], m.a)
    torch.testing.assert_close(qkv.bt_pool[row0:row0 + 128, 768:960], (m.b * m.scale).t())
    assert qkv.rank[:, 1].tolist() == [64, 0, 128] and qkv.row_start.tolist() == [256, 0, 128]
    assert stacks.slot_targets(1) == {(0, "q_proj"), (0, "v_proj"), (0, "down_proj")}
    assert stacks.group(0, "o").adapted_slots == set() and qkv.adapted_slots == {1}
    x = torch.randn(3, 576, generator=gen)
    base = torch.randn(3, 960, generator=gen)
    buffers = LoraMetaBuffers(16, 4, 4, "cpu")
    assert not torch.equal(twin(base.clone(), x, qkv, buffers.fill([((1, 1.0),)], [3])), base)
    stacks.clear(1)
    assert qkv.rank[:, 1].tolist() == [0, 0, 0] and stacks.slot_targets(1) == frozenset()
    assert torch.equal(apply_lora(base.clone(), x, qkv, buffers.fill([((1, 1.0),)], [3])), base)
    stacks.write(1, prepare_for_device(small, torch.float32, pin=False))  # rows 4.. still hold `big`
    out = twin(base.clone(), x, qkv, buffers.fill([((1, 1.0),)], [3]))
    expected = truth(base, x, qkv.shape, [None, small], [((1, 1.0),)], [3])
    assert rel_err(out, expected, base) < TOLERANCE[torch.float32]
    assert stacks.num_bytes > 0


def test_unadapted_group_is_skipped_unless_graph_safe():
    gen = torch.Generator().manual_seed(11)
    shapes = smol_groups()
    stacks = build_stacks(shapes, [random_adapter("q", shapes, {"q_proj": 8}, gen)], torch.float32)
    buffers = LoraMetaBuffers(16, 4, 4, "cpu")
    meta = buffers.fill([((0, 1.0),), ()], [2, 1])
    assert needs_lora(stacks.group(0, "qkv"), meta) and not needs_lora(stacks.group(0, "down"), meta)
    assert needs_lora(stacks.group(0, "down"), buffers.fill([((0, 1.0),)], [1], graph_safe=True))
    assert not needs_lora(stacks.group(0, "qkv"), buffers.fill([(), ()], [1, 1]))
    assert buffers.fill([(), ()], [1, 1]) is None


def test_one_slot_that_skips_a_group():
    """All rows on one slot that adapts nothing in `down` (and only some slices elsewhere): that group is
    skipped (out is base bit for bit, graph-safe metas included), the others match the math, and the
    error measure stays finite where the plain ratio is 0/0 (the GPU test's "down: nan")."""
    gen = torch.Generator().manual_seed(12)
    shapes = smol_groups()
    adapter = random_adapter("partial", shapes, {"q_proj": 8, "v_proj": 16, "gate_proj": 4}, gen)
    stacks = build_stacks(shapes, [None, adapter], torch.float32, max_rank=16)
    buffers = LoraMetaBuffers(64, 8, 4, "cpu")
    for graph_safe in (False, True):
        meta = buffers.fill([((1, 1.0),)] * 5, [1] * 5, graph_safe=graph_safe)
        for group in stacks.groups.values():
            x = torch.randn(5, group.shape.in_features, generator=gen)
            base = torch.randn(5, sum(group.out_features), generator=gen)
            out = apply_lora(base.clone(), x, group, meta)
            expected = truth(base, x, group.shape, [None, adapter], [((1, 1.0),)] * 5, [1] * 5)
            if group.shape.name in ("o", "down"):
                assert torch.equal(out, base) and needs_lora(group, meta) == graph_safe
                assert np.isnan(rel_err(out, expected, base)) and delta_error(out, expected, base) == 0.0
            else:
                assert delta_error(out, expected, base) < TOLERANCE[torch.float32]
    assert delta_error(base + 1, base, base) == float("inf")


def test_meta_layout():
    buffers = LoraMetaBuffers(512, 16, 4, "cpu")
    seq_pairs = [((2, 1.0),), (), ((5, 0.5), (2, 0.5)), ((2, 1.0),), ((7, 1.0),), ()]
    tokens = [40, 3, 1, 20, 0, 2]
    meta = buffers.fill(seq_pairs, tokens, num_tokens_padded=80)
    assert (meta.num_tokens, meta.num_active_tokens, meta.num_groups, meta.max_pairs) == (80, 61, 2, 2)
    assert meta.block_m == 16 and meta.active_slots == {2, 5}  # the 0-token sequence forms no group
    order = meta.token_order[:61].tolist()
    assert order == list(range(40)) + list(range(44, 64)) + [43]
    nb = meta.num_blocks
    assert meta.header.tolist() == [nb, 61] == [5, 61] and meta.launch_pairs == 2
    assert meta.block_group[:nb].tolist() == [0, 0, 0, 0, 1] and (meta.block_group[nb:] == -1).all()
    assert meta.block_start[:nb].tolist() == [0, 16, 32, 48, 60]
    assert meta.block_count[:nb].tolist() == [16, 16, 16, 12, 1]
    assert meta.block_num_pairs[:nb].tolist() == [1, 1, 1, 1, 2]
    assert meta.block_slots[4].tolist() == [5, 2, -1, -1] and meta.block_weights[4].tolist() == [0.5, 0.5, 0, 0]
    assert meta.block_slots[0].tolist() == [2, -1, -1, -1] and meta.block_weights[0].tolist() == [1, 0, 0, 0]
    assert meta.record_stride == 4 + 2 * 4 and meta.block_records.shape == (meta.max_blocks, 12)
    assert meta.group_slots[1].tolist() == [5, 2, -1, -1] and meta.group_weights[1].tolist() == [0.5, 0.5, 0, 0]
    assert meta.group_num_pairs[:2].tolist() == [1, 2]
    safe = buffers.fill(seq_pairs, tokens, num_tokens_padded=80, graph_safe=True)
    assert safe.launch_pairs == 4 and safe.num_blocks == 5
    empty = buffers.fill([()], [3], num_tokens_padded=8, graph_safe=True)
    assert empty.num_blocks == 0 and empty.header.tolist() == [0, 0] and (empty.block_group == -1).all()
    with pytest.raises(ValueError, match="capacity"):
        buffers.fill([((0, 1.0),)] * 2, [300, 300])
    with pytest.raises(ValueError, match="capacity"):
        buffers.fill([((0, 1.0),) * 5], [1])
    assert LoraMetaBuffers(4096, 16, 4, "cpu").fill([((0, 1.0),)], [2000]).block_m == 64
