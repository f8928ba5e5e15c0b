"""Triton LoRA shrink/expand on the GPU against the PyTorch twin: dtypes x real shapes x popularity,
CUDA-graph replay == eager bit for bit after refilling the metadata, run-to-run determinism.

Run on the device: pytest -m gpu tests/lora/test_gpu.py
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from loraplex.server.adapters.types import AdapterWeights, ModuleLoRA
from loraplex.server.lora import grouped_reference
from loraplex.server.lora.apply import apply_lora, kernel_config, rank_bound
from loraplex.server.lora.kernel_config import LoraKernelConfig
from loraplex.server.lora.prepare import prepare_for_device
from loraplex.server.lora.stacks import LoraStacks, ProjectionGroupShape
from loraplex.server.lora.step_meta import LoraMetaBuffers

from .test_grouped_parity import delta_error

pytestmark = pytest.mark.gpu

MODELS = {"smollm2": (576, 192, 1536), "llama3_8b": (4096, 1024, 14336)}  # hidden, kv width, intermediate
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""delta_error: ||kernel - twin|| / ||twin - base||, both in the compute dtype (0 / exact when the twin adds
nothing: slot 3 adapts no module of `down`, which made the first GPU run report "down: nan")."""
NUM_SLOTS, MAX_RANK = 16, 128
RANKS = (4, 8, 16, 32, 64, 128)


def group_shapes(model: str) -> list[ProjectionGroupShape]:
    h, kv, inter = MODELS[model]
    return [ProjectionGroupShape(0, "qkv", ("q_proj", "k_proj", "v_proj"), h, (h, kv, kv)),
            ProjectionGroupShape(0, "o", ("o_proj",), h, (h,)),
            ProjectionGroupShape(0, "gate_up", ("gate_proj", "up_proj"), h, (inter, inter)),
            ProjectionGroupShape(0, "down", ("down_proj",), inter, (h,))]


@functools.cache
def stacks_for(model: str, dtype: torch.dtype) -> LoraStacks:
    """16 slots, per-module ranks 4..128, pools poisoned with NaN first. Slot 0 adapts every module; every
    other slot skips some (slot 3 skips down_proj: all of the `down` group)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = group_shapes(model)
    stacks = LoraStacks(shapes, NUM_SLOTS, MAX_RANK, dtype, "cuda")
    for g in stacks.groups.values():
        g.a_pool.fill_(float("nan"))
        g.bt_pool.fill_(float("nan"))
    for slot in range(NUM_SLOTS):
        modules = {}
        for i, (shape, module, n_out) in enumerate((s, m, n) for s in shapes for m, n in zip(s.slices, s.out_features)):
            if slot and (slot + i) % 5 == 4:
                continue  # this slot does not adapt this module
            r = RANKS[(slot * 7 + i * 3) % len(RANKS)]
            a = torch.randn(r, shape.in_features, generator=gen, device="cuda") / shape.in_features ** 0.5
            b = torch.randn(n_out, r, generator=gen, device="cuda") / r ** 0.5
            modules[(0, module)] = ModuleLoRA(a=a, b=b, scale=0.5 + slot / NUM_SLOTS)
        stacks.write(slot, prepare_for_device(AdapterWeights(f"s{slot}", modules), dtype, pin=False))
    return stacks


def scenario(kind: str, gen: torch.Generator) -> tuple[list, list[int]]:
    """(seq_pairs, tokens_per_seq) across the popularity spectrum; every fifth decode row is a base row."""
    pick = lambda: int(torch.randint(0, NUM_SLOTS, (1,), generator=gen))  # noqa: E731
    if kind == "one":  # slot 3: no module of `down`, so that group must come back untouched
        return [((3, 1.0),)] * 64, [1] * 64
    if kind == "one_full":
        return [((0, 1.0),)] * 64, [1] * 64
    if kind == "hot":
        return [() if i % 5 == 4 else (((0, 5, 9)[i % 3], 1.0),) for i in range(61)], [1] * 61
    if kind == "distinct":
        return [() if i % 5 == 4 else ((i % NUM_SLOTS, 1.0),) for i in range(37)], [1] * 37
    if kind == "mixes":
        pairs = [tuple((pick(), float(torch.randn(1, generator=gen))) for _ in range(1 + i % 8)) for i in range(33)]
        return [() if i % 5 == 4 else p for i, p in enumerate(pairs)], [1] * 33
    if kind == "prefill":  # chunked prefill beside decode rows
        return ([((2, 1.0),), (), ((4, 0.5), (11, 0.5)), ((2, 1.0),)] + [((pick(), 1.0),)] * 13,
                [700, 133, 300, 7] + [1] * 13)
    raise ValueError(kind)


def run(model, dtype, seq_pairs, tokens, gen, graph_safe=False, padded=None):
    stacks = stacks_for(model, dtype)
    buffers = LoraMetaBuffers(2048, 64, 8, "cuda")
    num_rows = padded or sum(tokens)
    meta = buffers.fill(seq_pairs, tokens, num_tokens_padded=padded, graph_safe=graph_safe)
    results = []
    for group in stacks.groups.values():
        x = torch.randn(num_rows, group.shape.in_features, generator=gen, device="cuda").to(dtype)
        base = torch.randn(num_rows, sum(group.out_features), generator=gen, device="cuda").to(dtype)
        out = apply_lora(base.clone(), x, group, meta)
        twin = grouped_reference.add_lora(base.clone(), x, group, meta)
        results.append((group, x, base, out, twin, meta))
    return results


@pytest.mark.parametrize("kind", ["one", "one_full", "hot", "distinct", "mixes", "prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("model", list(MODELS))
def test_kernels_match_twin(model, dtype, kind):
    gen = torch.Generator(device="cuda").manual_seed(1)
    seq_pairs, tokens = scenario(kind, torch.Generator().manual_seed(2))
    base_rows = torch.repeat_interleave(torch.tensor([not p for p in seq_pairs]), torch.tensor(tokens))
    for group, _, base, out, twin, _ in run(model, dtype, seq_pairs, tokens, gen):
        name = group.shape.name
        assert torch.isfinite(out).all(), name
        assert torch.equal(out[base_rows.cuda()], base[base_rows.cuda()]), name
        err = delta_error(out, twin, base)
        assert err < TOLERANCE[dtype], f"{name}: {err:.2e}"
        if kind == "one" and name == "down":
            assert torch.equal(out, base)


def test_heuristic_paths():
    """Decode: qkv fused, down (K = 14336) shrink + expand with several K splits; prefill: shrink + expand."""
    stacks = stacks_for("llama3_8b", torch.bfloat16)
    meta = LoraMetaBuffers(4096, 8, 8, "cuda").fill([((0, 1.0),)], [8])
    x = lambda n, k: torch.empty(n, k, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    assert kernel_config(x(8, 4096), stacks.group(0, "qkv"), meta).fused
    down = kernel_config(x(8, 14336), stacks.group(0, "down"), meta)
    assert not down.fused and down.max_split > 1
    assert rank_bound(stacks.group(0, "down"), meta) == 32 == down.block_r  # slot 0's largest rank: 32
    assert not kernel_config(x(2048, 4096), stacks.group(0, "qkv"), LoraMetaBuffers(4096, 8, 8, "cuda").fill(
        [((0, 1.0),)], [2048])).fused


@pytest.mark.parametrize("model", list(MODELS))
def test_both_paths_every_plan_and_rank_chunks(model):
    """Fused and two-kernel paths, register fast path and scratch path (mixes; rank chunks of 32 at ranks up
    to 128), several program counts: all match the twin; program counts and programmatic dependent launch
    never change the bits."""
    from loraplex.server.lora import triton_expand, triton_shrink

    dtype = torch.bfloat16
    stacks = stacks_for(model, dtype)
    gen = torch.Generator(device="cuda").manual_seed(8)
    buffers = LoraMetaBuffers(2048, 64, 8, "cuda")
    for kind in ("distinct", "mixes", "one_full"):
        seq_pairs, tokens = scenario(kind, torch.Generator().manual_seed(9))
        meta = buffers.fill(seq_pairs, tokens)
        for group in stacks.groups.values():
            x = torch.randn(sum(tokens), group.shape.in_features, generator=gen, device="cuda").to(dtype)
            base = torch.randn(sum(tokens), sum(group.out_features), generator=gen, device="cuda").to(dtype)
            twin = grouped_reference.add_lora(base.clone(), x, group, meta)
            for block_r in (32, 128):
                for fused in (True, False):
                    outs = []
                    for programs in (7, 132, 1000):
                        config = LoraKernelConfig(fused=fused, block_k=64, block_r=block_r, block_n=128,
                                                  programs=programs, split_programs=2 * programs, max_split=8)
                        if fused:
                            out = triton_expand.lora_fused(x, group, meta, base.clone(), config, MAX_RANK)
                        else:
                            ws = triton_shrink.lora_shrink(x, group, meta, config, MAX_RANK)
                            out = triton_expand.lora_expand(ws, group, meta, base.clone(), config, MAX_RANK)
                        err = delta_error(out, twin, base)
                        assert err < TOLERANCE[dtype], f"{kind} {group.shape.name} r{block_r} fused={fused}: {err:.2e}"
                        outs.append(out)
                    if fused:  # the split count follows split_programs, so only the fused path is plan-free
                        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"{kind} {group.shape.name}"
                        no_pdl = dataclasses.replace(config, pdl=False)
                        assert torch.equal(outs[-1], triton_expand.lora_fused(x, group, meta, base.clone(), no_pdl,
                                                                              MAX_RANK))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deterministic_run_to_run(dtype):
    seq_pairs, tokens = scenario("mixes", torch.Generator().manual_seed(3))
    first = run("llama3_8b", dtype, seq_pairs, tokens, torch.Generator(device="cuda").manual_seed(4))
    second = run("llama3_8b", dtype, seq_pairs, tokens, torch.Generator(device="cuda").manual_seed(4))
    for (_, _, _, a, _, _), (_, _, _, b, _, _) in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", list(MODELS))
def test_graph_replay_equals_eager_after_refill(model):
    """Capture with a step that adapts nothing, refill with mixes: the replay equals eager bit for bit."""
    dtype, bucket = torch.bfloat16, 32
    stacks = stacks_for(model, dtype)
    groups = list(stacks.groups.values())
    gen = torch.Generator(device="cuda").manual_seed(5)
    xs = [torch.randn(bucket, g.shape.in_features, generator=gen, device="cuda").to(dtype) for g in groups]
    bases = [torch.randn(bucket, sum(g.out_features), generator=gen, device="cuda").to(dtype) for g in groups]
    outs = [torch.empty_like(b) for b in bases]
    buffers = LoraMetaBuffers(bucket, bucket, 8, "cuda")
    meta = buffers.fill([()] * 20, [1] * 20, num_tokens_padded=bucket, graph_safe=True)

    def step():
        for g, x, base, out in zip(groups, xs, bases, outs):
            out.copy_(base)
            apply_lora(out, x, g, meta)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (6, 7):
        seq_pairs, tokens = scenario("mixes", torch.Generator().manual_seed(seed))
        seq_pairs, tokens = seq_pairs[:27], tokens[:27]
        buffers.fill(seq_pairs, tokens, num_tokens_padded=bucket, graph_safe=True)
        graph.replay()
        eager_safe = buffers.fill(seq_pairs, tokens, num_tokens_padded=bucket, graph_safe=True)
        exact = buffers.fill(seq_pairs, tokens, num_tokens_padded=bucket)
        for g, x, base, out in zip(groups, xs, bases, outs):
            replayed = out.clone()
            assert not torch.equal(replayed, base)
            assert torch.equal(replayed, apply_lora(base.clone(), x, g, eager_safe)), g.shape.name
            assert torch.equal(replayed, apply_lora(base.clone(), x, g, exact)), g.shape.name
        torch.cuda.synchronize()
