"""The LoRA seam of a fused projection group: Triton kernels on CUDA, the PyTorch twin elsewhere."""
from __future__ import annotations

import torch

from . import grouped_reference
from .kernel_config import LoraKernelConfig, choose, num_sms
from .stacks import LoraGroupStacks
from .step_meta import LoraStepMeta


def needs_lora(group: LoraGroupStacks, meta: LoraStepMeta | None) -> bool:
    """Host decision: does this step add anything to this group? Always yes for graph-safe metas (a
    captured graph must not depend on which adapters the step that captured it happened to carry)."""
    if meta is None:
        return False
    return meta.graph_safe or not group.adapted_slots.isdisjoint(meta.active_slots)


def rank_bound(group: LoraGroupStacks, meta: LoraStepMeta) -> int:
    """An upper bound on every rank the step reads from this group: the pools' max_rank for graph-safe metas
    (a captured graph must serve any adapter), else the largest rank (any group) of the step's slots,
    computed once per step and shared by every group."""
    if meta.graph_safe or group.slot_max_rank is None:
        return group.max_rank
    key = ("rank_bound", id(group.slot_max_rank))
    hit = meta.cache.get(key)
    if hit is None:
        slots = sorted(meta.active_slots)
        value = int(group.slot_max_rank[slots].max()) if slots else 0
        hit = meta.cache[key] = (group.slot_max_rank, max(1, min(value, group.max_rank)))
    return hit[1]


def kernel_config(x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta,
                  bound: int | None = None) -> LoraKernelConfig:
    """The launch configuration: a function of x's rows, the group's shape and pools, the rank bound and the
    metadata's pair capacity only (all fixed for a graph-safe meta of a given batch bucket)."""
    bound = rank_bound(group, meta) if bound is None else bound
    return choose(x.shape[0], meta.block_m, group.num_slices, group.shape.in_features, max(group.out_features),
                  bound, x.dtype, num_sms(x.device), meta.pair_capacity, group.max_rank)


def apply_lora(out: torch.Tensor, x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta | None) -> torch.Tensor:
    """out[t, n0_j + n] += sum over token t's pairs (s, w) of w * (x[t] @ A_{s,j}^T) @ B_{s,j}^T [n]  (scale in B)

    for every slice j of the group (columns n0_j .. n0_j + N_j of the fused output), each (slice, slot)
    at its own rank; tokens of base sequences are not written. x: [T, K_in] in the pools' dtype;
    out: [T, N_total], the base GEMM's fused output, mutated and returned. meta None = no adapters.
    Capturable in a CUDA graph (no host syncs; the launch depends only on T and capacities when
    meta.graph_safe). One kernel for decode-sized steps (config.fused), else shrink + expand.
    """
    if not needs_lora(group, meta):
        return out
    if not out.is_cuda:
        return grouped_reference.add_lora(out, x, group, meta)
    from . import triton_expand, triton_shrink  # Triton is imported only where a GPU runs it

    bound = rank_bound(group, meta)
    config = kernel_config(x, group, meta, bound)
    if config.fused:
        return triton_expand.lora_fused(x, group, meta, out, config, bound)
    ws = triton_shrink.lora_shrink(x, group, meta, config, bound)
    return triton_expand.lora_expand(ws, group, meta, out, config, bound)
