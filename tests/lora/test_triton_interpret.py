"""The Triton LoRA kernels (fused, and shrink + expand) on CPU through Triton's interpreter, against the twin.

Tiny shapes chosen to hit every path: the fused kernel's register fast path (one pair, rank <= block_r)
and its scratch path (mixes, rank chunks), the same two for the two-kernel path; the device-side plan
(chunks of column tiles sized from the step's block count, several items per program, whole slices
when blocks outnumber programs; split-K counts); a tile straddling a slice end, rank 0 slices, a slot
that adapts nothing in a group, ragged K (no multiple of block_k) and even K, a group longer than
block_m, mixes with repeated slots, base rows, non-uniform row_start. Pool rows beyond each rank, the
split-K work space and the scratch hold NaN, so any read the kernels must not make shows up. The kernel
modules are loaded as private interpreted copies, so the regular ones (used by GPU tests in the same
process) stay compiled.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as triton_interpreter  # noqa: E402

from loraplex.server.lora import grouped_reference  # noqa: E402
from loraplex.server.lora.apply import rank_bound as step_rank_bound  # noqa: E402
from loraplex.server.lora.kernel_config import LoraKernelConfig, choose  # noqa: E402
from loraplex.server.lora.stacks import ProjectionGroupShape  # noqa: E402
from loraplex.server.lora.step_meta import LoraMetaBuffers  # noqa: E402

from .test_grouped_parity import build_stacks, delta_error, random_adapter, rel_err, truth  # noqa: E402

LORA_DIR = Path(grouped_reference.__file__).parent


def _patch_interpreter() -> None:
    """Two Triton 3.6 interpreter bugs (the compiled GPU path is unaffected):
    - loaded scalars are shape-(1,) arrays and int() on those fails on numpy >= 2.4, so loops bounded by
      a loaded value (pairs, ranks) break: index the one element;
    - tl.dot on bf16 multiplies the raw uint16 bit patterns: widen bf16 operands to fp32 first (exact)."""
    original_tensor = triton_interpreter._patch_lang_tensor
    if getattr(original_tensor, "loraplex_patched", False):
        return

    def patched_tensor(tensor, scope):
        original_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    builder = triton_interpreter.InterpreterBuilder
    original_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return triton_interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    patched_tensor.loraplex_patched = True
    triton_interpreter._patch_lang_tensor = patched_tensor
    builder.create_dot = patched_dot


def _load_interpreted(name: str):
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the module body runs
    try:
        spec = importlib.util.spec_from_file_location(f"loraplex.server.lora._interpreted_{name}",
                                                      LORA_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_patch_interpreter()
shrink_mod = _load_interpreted("triton_shrink")
expand_mod = _load_interpreted("triton_expand")
# The expand copy imported the regular (compiled) helpers by name: point it at the interpreted ones.
for _helper in ("cdiv", "shrink_rows", "split_plan"):
    setattr(expand_mod, _helper, getattr(shrink_mod, _helper))

SHAPE = ProjectionGroupShape(0, "qkv", ("q_proj", "k_proj", "v_proj"), 72, (48, 16, 24))
EVEN_SHAPE = ProjectionGroupShape(0, "qkv", ("q_proj", "k_proj", "v_proj"), 64, (48, 16, 24))
RANKS = [{"q_proj": 4, "k_proj": 8}, {"q_proj": 40, "k_proj": 16, "v_proj": 16}, {"q_proj": 1, "v_proj": 33},
         {"q_proj": 16, "k_proj": 16, "v_proj": 16}, {}]
"""Slot 4 adapts nothing here (like a slot whose adapter skips a whole group)."""
SEQ_PAIRS = [((1, 1.0),), (), ((0, 0.5), (2, -1.25), (1, 0.25), (0, 0.75)), ((3, 1.0),), ((1, 1.0),), ()]
TOKENS = [20, 2, 3, 1, 4, 1]
SINGLE_PAIRS = [((1, 1.0),), (), ((0, 0.5),), ((3, -2.0),), ((1, 1.0),), ((2, 0.25),)]
"""One pair per sequence (the register fast path when ranks fit one chunk)."""


def cfg(fused, programs, block_r=16, block_k=16, block_n=16, split_programs=8, max_split=3):
    return LoraKernelConfig(fused=fused, block_k=block_k, block_r=block_r, block_n=block_n, programs=programs,
                            split_programs=split_programs, max_split=max_split)


CONFIGS = {  # name -> (config, rank bound)
    "fused_chunked": (cfg(True, programs=40), 48),  # 2 rank chunks of 16 at rank 40 / 33
    "fused_whole_slices": (cfg(True, programs=3, block_r=64, block_n=32), 48),  # items > programs
    "fused_wide_rank": (cfg(True, programs=7, block_r=64, block_k=32), 48),
    "split_ragged": (cfg(False, programs=5, split_programs=8, max_split=3), 48),
    "split_one": (cfg(False, programs=64, block_r=64, split_programs=1, max_split=1), 48),
    "split_many": (cfg(False, programs=2, block_n=32, split_programs=64, max_split=4), 48),
}


def make_case(dtype, seed=0, shape=SHAPE, max_rank=48):
    gen = torch.Generator().manual_seed(seed)
    adapters = [random_adapter(f"a{s}", [shape], ranks, gen) for s, ranks in enumerate(RANKS)]
    stacks = build_stacks([shape], adapters, dtype, max_rank=max_rank, slot_order=[3, 1, 0, 4, 2])
    x = torch.randn(sum(TOKENS), shape.in_features, generator=gen).to(dtype)
    base = torch.randn(sum(TOKENS), sum(shape.out_features), generator=gen).to(dtype)
    return adapters, stacks.group(0, "qkv"), x, base


def run_kernels(x, group, meta, base, config, bound):
    """apply_lora's CUDA path, interpreted; the work space is poisoned with NaN first."""
    if config.fused:
        return expand_mod.lora_fused(x, group, meta, base.clone(), config, bound)
    ws = shrink_mod.workspace(x, group, meta, config, bound).fill_(float("nan"))
    ws = shrink_mod.lora_shrink(x, group, meta, config, bound, ws)
    return expand_mod.lora_expand(ws, group, meta, base.clone(), config, bound)


@pytest.mark.parametrize("name", CONFIGS)
def test_fp32_kernels_match_twin_and_math(name):
    config, bound = CONFIGS[name]
    adapters, group, x, base = make_case(torch.float32)
    meta = LoraMetaBuffers(64, 8, 4, "cpu").fill(SEQ_PAIRS, TOKENS)
    out = run_kernels(x, group, meta, base, config, bound)
    twin = grouped_reference.add_lora(base.clone(), x, group, meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=1e-5)
    expected = truth(base, x, SHAPE, adapters, SEQ_PAIRS, TOKENS)
    assert rel_err(out, expected, base) < 2e-5
    base_rows = torch.tensor([20, 21, 30])
    assert torch.equal(out[base_rows], base[base_rows]) and not torch.equal(out, base)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
@pytest.mark.parametrize("shape", [SHAPE, EVEN_SHAPE], ids=["ragged_k", "even_k"])
def test_single_pair_fast_path(fused, shape):
    """One pair per block and rank <= block_r: y in registers; rank 0 slices skipped, base rows untouched."""
    adapters, group, x, base = make_case(torch.float32, seed=1, shape=shape)
    meta = LoraMetaBuffers(64, 8, 4, "cpu").fill(SINGLE_PAIRS, TOKENS)
    for programs in (1, 6, 100):
        config = cfg(fused, programs=programs, block_r=64)
        out = run_kernels(x, group, meta, base, config, 48)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, grouped_reference.add_lora(base.clone(), x, group, meta),
                                   rtol=1e-5, atol=1e-5)
        expected = truth(base, x, shape, adapters, SINGLE_PAIRS, TOKENS)
        assert rel_err(out, expected, base) < 2e-5
        assert torch.equal(out[20:22], base[20:22])
        # Slot 0 does not adapt v_proj: its token's v columns are left exactly as they were.
        assert torch.equal(out[22:25, 64:], base[22:25, 64:])


def test_plan_does_not_change_results():
    """Every program count gives the same bits (the plan moves work between programs, never reorders sums)."""
    _, group, x, base = make_case(torch.float32, seed=2)
    meta = LoraMetaBuffers(64, 8, 4, "cpu").fill(SEQ_PAIRS, TOKENS)
    fused = [run_kernels(x, group, meta, base, cfg(True, programs=p), 48) for p in (1, 5, 40)]
    assert all(torch.equal(fused[0], o) for o in fused[1:])
    split = [run_kernels(x, group, meta, base, cfg(False, programs=p), 48) for p in (1, 5, 40)]
    assert all(torch.equal(split[0], o) for o in split[1:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_graph_safe_launch_equals_exact_launch_bit_for_bit(fused):
    """Capacity grid (padded tokens), pair capacity and the pools' max rank as the bound change nothing."""
    _, group, x, base = make_case(torch.float32, seed=3)
    buffers = LoraMetaBuffers(64, 8, 4, "cpu")
    config = cfg(fused, programs=6)
    exact = run_kernels(x, group, buffers.fill(SEQ_PAIRS, TOKENS), base, config, 48)
    padded_x = torch.cat([x, torch.randn(9, x.shape[1])])
    padded_base = torch.cat([base, torch.randn(9, base.shape[1])])
    safe_meta = buffers.fill(SEQ_PAIRS, TOKENS, num_tokens_padded=padded_x.shape[0], graph_safe=True)
    safe = run_kernels(padded_x, group, safe_meta, padded_base, config, group.max_rank)
    assert torch.equal(safe[:x.shape[0]], exact)
    assert torch.equal(safe[x.shape[0]:], padded_base[x.shape[0]:])  # padded rows untouched
    empty = buffers.fill([(), ()], [3, 4], num_tokens_padded=padded_x.shape[0], graph_safe=True)
    assert torch.equal(run_kernels(padded_x, group, empty, padded_base, config, group.max_rank), padded_base)


def test_refilled_buffers_drive_the_kernels():
    """Same device buffers, different step: the kernels follow the new data (what graph replays rely on)."""
    _, group, x, base = make_case(torch.float32, seed=4)
    buffers = LoraMetaBuffers(64, 8, 4, "cpu")
    buffers.fill(SEQ_PAIRS, TOKENS)
    pairs = [((3, -0.5), (3, 2.0)), ((2, 1.0),), ((0, 1.0),), (), ((1, 0.3),), ((2, 1.0),)]
    meta = buffers.fill(pairs, TOKENS)
    for fused in (True, False):
        out = run_kernels(x, group, meta, base, cfg(fused, programs=4), 48)
        torch.testing.assert_close(out, grouped_reference.add_lora(base.clone(), x, group, meta),
                                   rtol=1e-5, atol=1e-5)


def test_slot_adapting_nothing_in_the_group_leaves_out_exact():
    """The GPU run's 'one' failure: every row on a slot with no module in this group. The op must add
    nothing (out == base bit for bit), and so must the twin: the relative error is 0/0 there, which is
    why the comparisons use `delta_error` (exact equality when the twin's delta is zero). Graph-safe
    metas launch the kernels even so: they must find every rank 0 and write nothing."""
    _, group, x, base = make_case(torch.float32, seed=5)
    buffers = LoraMetaBuffers(64, 8, 4, "cpu")
    for graph_safe in (False, True):
        meta = buffers.fill([((4, 1.0),)] * 6, TOKENS, graph_safe=graph_safe)
        twin = grouped_reference.add_lora(base.clone(), x, group, meta)
        assert torch.equal(twin, base)
        for fused in (True, False):
            out = run_kernels(x, group, meta, base, cfg(fused, programs=5, block_r=64), 48)
            assert torch.equal(out, base)
            assert delta_error(out, twin, base) == 0.0


def test_bf16_kernels_close_to_twin():
    """bf16 within tolerance (the interpreter truncates where the GPU rounds: exactness is checked in fp32)."""
    adapters, group, x, base = make_case(torch.bfloat16, seed=6)
    meta = LoraMetaBuffers(64, 8, 4, "cpu").fill(SEQ_PAIRS, TOKENS)
    for config, bound in (CONFIGS["fused_wide_rank"], CONFIGS["split_ragged"]):
        out = run_kernels(x, group, meta, base, config, bound)
        expected = truth(base, x, SHAPE, adapters, SEQ_PAIRS, TOKENS)
        assert torch.isfinite(out).all()
        assert rel_err(out, expected, base) < 3e-2
        assert torch.equal(out[20], base[20])


def test_heuristic_config_on_real_shapes():
    """The launch path apply_lora takes on CUDA (heuristic config, rank bound) on SmolLM2's o and down."""
    from .test_grouped_parity import smol_groups

    gen = torch.Generator().manual_seed(7)
    shapes = [smol_groups()[1], smol_groups()[3]]
    adapters = [random_adapter(f"a{s}", shapes, {"o_proj": r, "down_proj": r}, gen) for s, r in enumerate((16, 64, 8))]
    stacks = build_stacks(shapes, adapters, torch.float32, max_rank=64)
    seq_pairs, tokens = [((1, 1.0),), (), ((0, 0.5), (2, 0.5)), ((1, 1.0),)], [1, 1, 1, 2]
    meta = LoraMetaBuffers(16, 4, 4, "cpu").fill(seq_pairs, tokens, num_tokens_padded=8, graph_safe=True)
    for group in stacks.groups.values():
        x = torch.randn(8, group.shape.in_features, generator=gen)
        base = torch.randn(8, 576, generator=gen)
        bound = step_rank_bound(group, meta)
        config = choose(8, meta.block_m, group.num_slices, group.shape.in_features, max(group.out_features), bound,
                        x.dtype, 132, meta.launch_pairs)
        assert config.fused and config.block_r == 64 and bound == 64
        out = run_kernels(x, group, meta, base, config, bound)
        torch.testing.assert_close(out, grouped_reference.add_lora(base.clone(), x, group, meta), rtol=1e-5,
                                   atol=1e-5)
        assert torch.equal(out[[1, 5, 6, 7]], base[[1, 5, 6, 7]])


def test_rank_bound_follows_the_step():
    """Eager steps size rank tiles from the ranks in use; graph-safe metas from the pools."""
    gen = torch.Generator().manual_seed(8)
    adapters = [random_adapter("small", [SHAPE], {"q_proj": 8, "v_proj": 16}, gen),
                random_adapter("big", [SHAPE], {"k_proj": 40}, gen)]
    group = build_stacks([SHAPE], adapters, torch.float32, max_rank=64).group(0, "qkv")
    buffers = LoraMetaBuffers(16, 4, 4, "cpu")
    assert step_rank_bound(group, buffers.fill([((0, 1.0),)], [2])) == 16
    assert step_rank_bound(group, buffers.fill([((0, 1.0),), ((1, 1.0),)], [2, 1])) == 40
    assert step_rank_bound(group, buffers.fill([((0, 1.0),)], [2], graph_safe=True)) == 64
