"""Merge one adapter, or a weighted set, exactly into the base's full-precision weights.

    LINEAR:                  W' = W + sum_i w_i * s_i * B_i A_i          (exact, any mix of ranks)
    TIES, DARE_LINEAR/TIES:  W' = W + merge_deltas([s_i B_i A_i], w, method, density, seeded per module)

The non-linear methods reuse server/adapters/mix.py (the same merge, and the same per-module DARE
streams, as the server's derived adapters), but keep the dense result: no SVD back to a LoRA, so nothing
is lost. The base is read in fp32 (a GGUF is dequantized first); the merge happens in fp32 and the
caller chooses the output dtype. Nothing is ever re-quantized here (see quantize.py for --quantize).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open

from loraplex.server.adapters.loader import load_adapter
from loraplex.server.adapters.mix import merge_deltas, module_generator, task_delta, validate_mix
from loraplex.server.adapters.peft_format import ADAPTER_CONFIG
from loraplex.server.adapters.types import AdapterWeights
from loraplex.server.errors import InvalidAdapter, InvalidArgument, ModelLoadError
from loraplex.server.types import MergeMethod

from .base import BaseModel
from .outputs import file_sha256

log = logging.getLogger(__name__)

NO_RANK_LIMIT = 1 << 20
"""Export has no slots: any rank the base's shapes allow is fine."""
BASE_WEIGHTS = ("checkpoint", "nf4")
_PROJECTION = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.weight")


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    path: str
    weight: float = 1.0
    name: str = ""
    """Defaults to the folder name."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass(frozen=True, slots=True)
class MergeRecipe:
    """What to merge and how; `to_dict` is what results.json and export_info.json record."""

    adapters: tuple[AdapterSpec, ...]
    method: MergeMethod = MergeMethod.LINEAR
    density: float = 1.0
    """Fraction kept by TIES / DARE (ignored by LINEAR)."""
    seed: int = 0
    """DARE's drop masks (one stream per module, as the server's mixes)."""
    base_weights: str = "checkpoint"
    """checkpoint: the base's own weights; nf4: its projections as the NF4 server computes with them."""
    allow_mixed_bases: bool = False

    def __post_init__(self):
        problems = []
        if not self.adapters:
            problems.append("at least one adapter is needed")
        if self.method is MergeMethod.LINEAR and self.density != 1.0:
            problems.append(f"density {self.density} applies to ties/dare_* only (linear merges exactly)")
        if not (math.isfinite(self.density) and 0 < self.density <= 1):
            problems.append(f"density must be in (0, 1], got {self.density}")
        if not 0 <= self.seed < 2**64:
            problems.append(f"seed must fit in uint64, got {self.seed}")
        if self.base_weights not in BASE_WEIGHTS:
            problems.append(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, got {self.base_weights!r}")
        for spec in self.adapters:
            if not math.isfinite(spec.weight):
                problems.append(f"weight of adapter {spec.label!r} must be finite, got {spec.weight}")
        labels = [s.label for s in self.adapters]
        if len(set(labels)) != len(labels):
            problems.append(f"adapter names must be unique, got {labels} (name them explicitly)")
        if problems:
            raise InvalidArgument("merge: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"method": self.method.value, "density": self.density, "seed": self.seed,
                "base_weights": self.base_weights,
                "adapters": [asdict(s) | {"name": s.label} for s in self.adapters]}


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    spec: AdapterSpec
    weights: AdapterWeights
    config_sha256: str
    base_model: str | None
    """base_model_name_or_path from adapter_config.json."""

    def describe(self) -> dict:
        return {"name": self.spec.label, "path": str(self.spec.path), "weight": self.spec.weight,
                "sha256": self.weights.sha256, "config_sha256": self.config_sha256,
                "rank": self.weights.rank, "num_modules": len(self.weights.modules),
                "base_model_name_or_path": self.base_model}


@dataclass(slots=True)
class MergeReport:
    recipe: dict
    adapters: list[dict]
    num_tensors_changed: int = 0
    max_abs_delta: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def load_adapters(recipe: MergeRecipe, base: BaseModel) -> list[LoadedAdapter]:
    """Validate every adapter against the base (load_adapter), and the set against itself."""
    loaded = []
    for spec in recipe.adapters:
        weights = load_adapter(spec.path, base.arch, NO_RANK_LIMIT, spec.label)
        config_path = Path(spec.path) / ADAPTER_CONFIG
        loaded.append(LoadedAdapter(spec, weights, file_sha256(config_path),
                                    weights.config.get("base_model_name_or_path")))
    if not recipe.allow_mixed_bases:
        _check_same_base(loaded)
    if recipe.method is not MergeMethod.LINEAR:
        validate_mix([a.weights for a in loaded], [a.spec.weight for a in loaded], recipe.method, recipe.density,
                     recipe.seed, max_rank=1)
    return loaded


def _check_same_base(adapters: list[LoadedAdapter]) -> None:
    """Adapters that say they were trained on different bases cannot be mixed meaningfully."""
    seen: dict[str, str] = {}
    for adapter in adapters:
        key = _base_key(adapter.base_model)
        if key is None:
            continue
        for other_key, other in seen.items():
            if other_key != key:
                raise InvalidAdapter(
                    f"adapters {other!r} and {adapter.spec.label!r} were trained on different bases "
                    f"({other_key!r} vs {key!r}, base_model_name_or_path); pass --allow-mixed-bases to merge anyway")
        seen.setdefault(key, adapter.spec.label)


def trained_on_warnings(adapters: list[LoadedAdapter], base: BaseModel) -> list[str]:
    """Adapters whose adapter_config.json names another model than `base`, as warnings.

    Shapes were checked (load_adapter): a mismatch there is an error. Equal shapes across different
    bases (base vs instruct, Llama 3 vs 3.1) can only be told by name, and names are unreliable (a hub
    id, a local copy, a path on the training machine), so this warns rather than refuses. A name
    matches when it is the base's folder, or its last path part equals the base's model id's or folder's.
    """
    names = {_model_name(base.model_id), Path(base.path).name.lower()}
    found = []
    for adapter in adapters:
        named = adapter.base_model
        if not named or _model_name(named) in names:
            continue
        path = Path(named).expanduser()
        if path.exists() and path.resolve() == Path(base.path).resolve():
            continue
        found.append(f"adapter {adapter.spec.label!r} names {named!r} as its base (base_model_name_or_path), "
                     f"not {base.model_id!r}; its shapes fit, so it is merged, but check it was trained on this base")
    return found


def _model_name(name: str | None) -> str | None:
    return Path(name.rstrip("/")).name.lower() if name else None


def _base_key(name: str | None) -> str | None:
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def module_delta(adapters: Sequence[AdapterWeights], weights: Sequence[float], recipe: MergeRecipe, layer: int,
                 module: str) -> torch.Tensor | None:
    """The merged delta [out, in] fp32 for one projection, or None when no adapter touches it."""
    present = [a.modules.get((layer, module)) for a in adapters]
    if all(m is None for m in present):
        return None
    if recipe.method is MergeMethod.LINEAR:
        delta = None
        for m, w in zip(present, weights):
            if m is not None:
                term = task_delta(m) * w
                delta = term if delta is None else delta.add_(term)
        return delta
    shape = next((m.b.shape[0], m.a.shape[1]) for m in present if m is not None)
    deltas = [torch.zeros(shape) if m is None else task_delta(m) for m in present]
    generator = module_generator(recipe.seed, layer, module, "drop", "cpu")
    return merge_deltas(deltas, weights, recipe.method, recipe.density, generator)


def merged_tensors(base: BaseModel, adapters: list[LoadedAdapter], recipe: MergeRecipe,
                   report: MergeReport) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every tensor of the base, projections merged; one tensor in memory at a time."""
    started = time.perf_counter()
    weights = [a.weights for a in adapters]
    factors = [a.spec.weight for a in adapters]
    wanted = set().union(*(w.modules for w in weights))
    applied = set()
    for path in sorted(base.path.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).to(torch.float32)
                if not bool(torch.isfinite(tensor).all()):
                    raise ModelLoadError(f"base {base.path}: tensor {name!r} has NaN or infinite values")
                match = _PROJECTION.fullmatch(name)
                if match:
                    layer, module = int(match[1]), match[2]
                    if recipe.base_weights == "nf4":
                        tensor = _nf4_roundtrip(tensor)
                    delta = module_delta(weights, factors, recipe, layer, module)
                    if delta is not None:
                        if delta.shape != tensor.shape:  # load_adapter checked the arch; the file must agree
                            raise ModelLoadError(f"base {base.path}: {name} has shape {list(tensor.shape)}, "
                                                 f"config.json implies {list(delta.shape)}")
                        tensor = tensor + delta
                        applied.add((layer, module))
                        report.num_tensors_changed += 1
                        report.max_abs_delta = max(report.max_abs_delta, float(delta.abs().max()))
                        if not bool(torch.isfinite(tensor).all()):
                            raise InvalidArgument(f"merge: {name} is not finite after the {recipe.method.value} "
                                                  "merge (adapter weights too large?)")
                yield name, tensor
    missing = sorted(wanted - applied)
    if missing:
        raise ModelLoadError(f"base {base.path}: no weight for adapted module(s) "
                             + ", ".join(base.arch.module_path(*m) for m in missing[:5]))
    report.seconds = time.perf_counter() - started


def _nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the NF4 server computes with it: dequant(quant_nf4(W)), fp32."""
    from loraplex.server.model.layers import NF4Linear

    return NF4Linear(weight, None).dequantized_weight().to(torch.float32)


def start_report(recipe: MergeRecipe, adapters: list[LoadedAdapter]) -> MergeReport:
    return MergeReport(recipe=recipe.to_dict(), adapters=[a.describe() for a in adapters])
