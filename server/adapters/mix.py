"""TIES / DARE mixes as derived adapters: merge the dense task deltas, compress back to LoRA by SVD.

LINEAR mixes are exact and applied per request elsewhere. These methods are not linear in the
adapters (magnitude trim, sign election, random drop), so the server builds the merged adapter once
per content key (mix_key; kept by mix_cache.py) and serves it like any other. The merge follows
peft.utils.merge_utils exactly, except that DARE draws from our seeded generator, one stream per
module, never from the global RNG. Compressing a merge back to a LoRA is lossy whenever the merge's
rank exceeds `max_rank` (TIES and DARE raise the rank); the error is measured per module, reported
and logged, never hidden.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import InvalidArgument
from ..types import MergeMethod
from .types import AdapterWeights, ModuleLoRA

log = logging.getLogger(__name__)

MIX_VERSION = 1
"""Part of every key: bump it when the merge or the compression changes, so cached mixes go stale."""
FULL_SVD_MAX_DIM = 1024
"""Exact SVD up to this min(out, in). Above, randomized: a full SVD of 4096x14336 takes ~120 s on one CPU core."""
OVERSAMPLE, POWER_ITERS = 16, 4
"""Randomized SVD: extra sampled directions and power iterations (Halko et al. 2011)."""
LOSSY_WARN = 1e-3
"""A build whose worst module's relative error exceeds this logs a warning."""


@dataclass(frozen=True, slots=True)
class MixReport:
    """How a derived adapter was made and how far its LoRA is from the exact merge."""

    method: MergeMethod
    density: float
    seed: int
    rank: int
    """Largest rank kept over modules: min(max_rank, numerical rank of the merge)."""
    max_rel_error: float
    """Max over modules of ||merged - b @ a||_F / ||merged||_F (0 for an all-zero merge)."""
    mean_rel_error: float
    seconds: float
    num_modules: int

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "method": self.method.value})

    @staticmethod
    def from_json(text: str) -> MixReport:
        fields = json.loads(text)
        return MixReport(**{**fields, "method": MergeMethod(fields["method"])})


def mix_key(parts: Sequence[tuple[str, str]], weights: Sequence[float], method: MergeMethod, density: float,
            seed: int, rank: int) -> str:
    """sha256 hex of everything a derived adapter depends on; parts are (name, content sha or version).

    Order matters (DARE draws in adapter order). The device is not part of the key: CPU and CUDA
    draw different DARE masks, and whichever builds first is what the key serves from then on."""
    recipe = {"v": MIX_VERSION, "parts": [[str(n), str(s)] for n, s in parts], "weights": [float(w) for w in weights],
              "method": method.value, "density": float(density), "seed": int(seed), "rank": int(rank)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def module_generator(seed: int, layer: int, module: str, purpose: str, device: str | torch.device) -> torch.Generator:
    """A fresh generator for one module's draws, seeded by sha256 of (purpose, seed, layer, module).

    Modules get independent streams whatever order they are built in; the global RNG is never used.
    Same seed, same device type: same draws. CPU (mt19937) and CUDA (Philox) streams differ."""
    digest = hashlib.sha256(json.dumps([purpose, int(seed), int(layer), module]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def task_delta(m: ModuleLoRA, device: str | torch.device = "cpu") -> torch.Tensor:
    """The module's task tensor scale * b @ a, fp32 on `device`: [out, in]."""
    return (m.b.to(device, torch.float32) @ m.a.to(device, torch.float32)) * m.scale


def merge_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], method: MergeMethod, density: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """peft.utils.merge_utils.{ties, dare_linear, dare_ties} (majority_sign_method="total"), DARE seeded.

        density == 1:  t_i = d_i                             (no trim, no draws)
        TIES:          t_i = d_i * [|d_i| among the int(density * numel) largest of |d_i|]
        DARE_*:        t_i = d_i * bernoulli(density) / density, masks drawn from `generator` for i = 0..n-1
        DARE_LINEAR:   out = sum_i w_i t_i
        TIES, DARE_TIES:
                       s = +1 where sum_i t_i >= 0 else -1   (election on the unweighted t_i, as peft)
                       agree_i = sign(t_i) == s               (zeros never agree)
                       out = sum_i w_i t_i agree_i / max(1, sum_i agree_i)

    deltas: n fp32 tensors [out, in] on one device (`generator` on that device, needed by DARE with
    density < 1); weights: n floats. Returns a new [out, in] fp32 tensor; inputs are not mutated.
    Peak memory is about n + 4 deltas (peft's stacked version needs about 5n).
    """
    assert len(deltas) == len(weights) > 0 and 0 < density <= 1
    if method is MergeMethod.TIES:
        trimmed = [_magnitude_prune(d, density) for d in deltas]
    elif method in (MergeMethod.DARE_LINEAR, MergeMethod.DARE_TIES):
        trimmed = [_random_prune(d, density, generator) for d in deltas]
    else:
        raise ValueError(f"merge_deltas does not do {method}")
    out = torch.zeros_like(trimmed[0])
    if method is MergeMethod.DARE_LINEAR:
        for t, w in zip(trimmed, weights):
            out += t * w
        return out
    for t in trimmed:
        out += t
    majority = torch.where(out >= 0, 1.0, -1.0)
    out.zero_()
    count = torch.zeros_like(out)
    for t, w in zip(trimmed, weights):
        agree = t.sign() == majority
        out += t * w * agree
        count += agree
    return out.div_(count.clamp_(min=1.0))


def _magnitude_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    """peft's magnitude_based_pruning (keep the k largest |d|) through a threshold, so that CPU and CUDA agree.

    Where magnitudes tie at the threshold (common at 8B sizes: fp32 has ~8M values per octave) the
    first ones in row-major order are kept; peft's topk leaves that choice to the implementation."""
    if density >= 1:
        return d
    k = int(density * d.numel())
    if k == 0:
        return torch.zeros_like(d)
    magnitude = d.abs().reshape(-1)
    if magnitude.is_cuda:  # 4096x14336 on an H100: topk 1.4 ms, kthvalue 430 ms (one block per slice)
        threshold = magnitude.topk(k, sorted=False).values.min()
    else:  # on CPU the other way round: kthvalue 1.5 s, topk 8 s
        threshold = magnitude.kthvalue(magnitude.numel() - k + 1).values
    if threshold == 0:  # fewer than k nonzeros: all kept; the zeros peft also keeps change nothing
        return d * (magnitude > 0).view_as(d)
    keep = magnitude > threshold
    tied = (magnitude == threshold).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return d * keep.view_as(d)


def _random_prune(d: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """peft's random_pruning(rescale=True) drawing from `generator`."""
    if density >= 1:
        return d
    assert generator is not None, "DARE needs a seeded generator"
    mask = torch.bernoulli(torch.full_like(d, density), generator=generator)
    return d * mask / density


def low_rank(merged: torch.Tensor, max_rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(b [out, k], a [k, in]) fp32 with b @ a ~= merged, k = max(1, min(max_rank, numerical rank)).

    b = U[:, :k] * S[:k], a = Vh[:k]: the best rank-k approximation with an exact SVD (used when
    min(out, in) <= FULL_SVD_MAX_DIM); above that a randomized SVD drawn from `generator`, which is
    exact when the merge's rank is <= max_rank + OVERSAMPLE and near-optimal otherwise."""
    out_dim, in_dim = merged.shape
    q = min(max_rank + OVERSAMPLE, out_dim, in_dim)
    if min(out_dim, in_dim) <= FULL_SVD_MAX_DIM or q == min(out_dim, in_dim):
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(merged, q, generator)
    tolerance = s[0] * max(out_dim, in_dim) * torch.finfo(s.dtype).eps  # as torch.linalg.matrix_rank
    k = max(1, min(max_rank, int((s > tolerance).sum())))
    return (u[:, :k] * s[:k]).contiguous(), vh[:k].clone()


def _randomized_svd(m: torch.Tensor, q: int, generator: torch.Generator):
    """Top-q (U, S, Vh) of m by range finding with power iterations (torch.svd_lowrank uses the global RNG)."""
    omega = torch.randn(m.shape[1], q, generator=generator, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(m.mT @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ m, full_matrices=False)
    return basis @ u, s, vh


def _frobenius(x: torch.Tensor) -> float:
    """||x||_F through fp32 row norms summed in fp64: a CPU fp32 norm of 4096x14336 is off by ~0.1%."""
    return float(torch.linalg.vector_norm(x, dim=1).double().square().sum().sqrt())


def validate_mix(adapters: Sequence[AdapterWeights], weights: Sequence[float], method: MergeMethod, density: float,
                 seed: int, max_rank: int) -> None:
    """InvalidArgument, naming the field, for a mix derive_adapter cannot build."""
    if not adapters:
        raise InvalidArgument("adapters: a TIES/DARE mix needs at least one adapter", field="adapters")
    if len(weights) != len(adapters):
        raise InvalidArgument(f"adapters: {len(adapters)} adapters but {len(weights)} weights", field="adapters")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise InvalidArgument(f"adapters[{i}].weight must be finite, got {w}", field=f"adapters[{i}].weight")
    if method not in (MergeMethod.TIES, MergeMethod.DARE_LINEAR, MergeMethod.DARE_TIES):
        raise InvalidArgument(f"merge_method {method.name} is not derived (LINEAR is exact, applied per request)",
                              field="merge_method")
    if not (math.isfinite(density) and 0 < density <= 1):
        raise InvalidArgument(f"density must be in (0, 1], got {density}", field="density")
    if not 0 <= seed < 2**64:
        raise InvalidArgument(f"merge_seed must fit in uint64, got {seed}", field="merge_seed")
    if max_rank < 1:
        raise InvalidArgument(f"max_rank must be >= 1, got {max_rank}", field="max_rank")
    shapes: dict[tuple[int, str], tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        for key, m in adapter.modules.items():
            shape = (m.b.shape[0], m.a.shape[1])
            first = shapes.setdefault(key, (adapter.name, shape))
            if first[1] != shape:
                raise InvalidArgument(f"adapters: layer {key[0]} {key[1]} is [out, in] = {list(first[1])} in "
                                      f"{first[0]!r} but {list(shape)} in {adapter.name!r}", field="adapters")
    if not shapes:
        raise InvalidArgument("adapters: none of the adapters has a module to merge", field="adapters")


def derive_adapter(adapters: Sequence[AdapterWeights], weights: Sequence[float], method: MergeMethod, density: float,
                   seed: int, max_rank: int, name: str, device: str | torch.device = "cpu",
                   key: str = "") -> tuple[AdapterWeights, MixReport]:
    """The TIES / DARE merge of the adapters' task deltas, per module, compressed to LoRA (scale 1, fp32, CPU).

    Every (layer, module) of any adapter is merged; an adapter without it contributes a zero delta.
    The heavy math runs on `device`; its DARE draws differ between CPU and CUDA (see module_generator).
    """
    validate_mix(adapters, weights, method, density, seed, max_rank)
    start = time.perf_counter()
    modules: dict[tuple[int, str], ModuleLoRA] = {}
    errors: list[float] = []
    for layer, module in sorted(set().union(*(a.modules for a in adapters))):
        present = [a.modules.get((layer, module)) for a in adapters]
        shape = next((m.b.shape[0], m.a.shape[1]) for m in present if m is not None)
        deltas = [torch.zeros(shape, device=device) if m is None else task_delta(m, device) for m in present]
        merged = merge_deltas(deltas, weights, method, density, module_generator(seed, layer, module, "drop", device))
        del deltas
        if not bool(torch.isfinite(merged).all()):
            raise InvalidArgument(f"adapters: the {method.value} merge of layer {layer} {module} is not finite",
                                  field="adapters")
        # The SVD's stream ignores the merge seed, so a TIES mix does not depend on it.
        b, a = low_rank(merged, max_rank, module_generator(0, layer, module, "svd", device))
        norm = _frobenius(merged)
        errors.append(_frobenius(merged - b @ a) / norm if norm > 0 else 0.0)
        modules[(layer, module)] = ModuleLoRA(a=a.cpu(), b=b.cpu(), scale=1.0)
    report = MixReport(method=method, density=float(density), seed=int(seed),
                       rank=max(m.rank for m in modules.values()), max_rel_error=max(errors),
                       mean_rel_error=sum(errors) / len(errors), seconds=time.perf_counter() - start,
                       num_modules=len(modules))
    recipe = {"method": method.value, "density": density, "seed": seed, "max_rank": max_rank,
              "parts": [{"name": a.name, "sha256": a.sha256, "weight": float(w)} for a, w in zip(adapters, weights)]}
    (log.warning if report.max_rel_error > LOSSY_WARN else log.info)(
        "derived %s: %s of %d adapters, rank %d, %d modules, rel. error max %.3g mean %.3g, %.2f s", name,
        method.value, len(adapters), report.rank, report.num_modules, report.max_rel_error, report.mean_rel_error,
        report.seconds)
    return AdapterWeights(name=name, modules=modules, source=f"mix:{method.value}", sha256=key,
                          config={"mix": recipe}), report
