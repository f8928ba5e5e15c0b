"""Read one PEFT LoRA folder into AdapterWeights, validated against the base model.

A pure function: it returns weights that passed every check or raises, so nothing is ever
half-loaded. Format problems raise InvalidAdapter; an adapter that does not fit this base (layers,
projections, shapes, ranks) raises AdapterMismatch. Every message names the adapter, the tensor or
module, and what was expected against what was found (vLLM lora_model.py does the same).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterMismatch, InvalidAdapter
from ..hashing import file_sha256
from ..model.arch import LINEAR_MODULES, ModelArch
from .peft_format import (ADAPTER_WEIGHTS, PICKLE_SUFFIXES, PeftLoraConfig, is_embedding_key, lora_target,
                          parse_key, pattern_matches, read_lora_config, shown_path, unsupported_features)
from .types import AdapterWeights, ModuleLoRA

log = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KEY_HINTS = {"lora_magnitude_vector": " (a DoRA magnitude vector)", "lora_B.bias": " (a lora_bias term)",
              "base_layer": " (a copy of a base weight)"}
_MAX_LISTED = 5


def load_adapter(folder: str | Path, arch: ModelArch, max_rank: int, name: str,
                 shown_as: str | None = None) -> AdapterWeights:
    """Validate and read `folder` (adapter_config.json + adapter_model.safetensors) for the base `arch`.

    Tensors stay in the file's dtype on the CPU, owned (not views of the mapped file); B is unscaled.
    `shown_as`: how messages name the folder (the caller's source, or "" for an upload: file names
    only), so that they never show where the server keeps its copies.
    """
    folder = Path(folder)
    shown_folder = str(folder) if shown_as is None else (shown_as or "the upload")
    if not folder.exists():
        raise InvalidAdapter(f"adapter {name!r}: {shown_folder} does not exist")
    if not folder.is_dir():
        raise InvalidAdapter(f"adapter {name!r}: {shown_folder} is not a folder (expected a PEFT adapter folder)")
    config = read_lora_config(folder, name, shown_as)
    reasons = unsupported_features(config.raw)
    if reasons:
        raise InvalidAdapter(f"adapter {name!r}: unsupported PEFT features: " + "; ".join(reasons))
    weights_path = _weights_file(folder, name, shown_as)
    shown = shown_path(folder, ADAPTER_WEIGHTS, shown_as)
    stamp = _stamp(weights_path)
    sha256 = file_sha256(weights_path)
    tensors = _read_tensors(weights_path, arch, name, shown)
    if _stamp(weights_path) != stamp:  # the sha must describe exactly the bytes we validated
        raise InvalidAdapter(f"adapter {name!r}: {shown} changed while it was being loaded")
    modules = {}
    for (layer, module), (a, b) in sorted(tensors.items(), key=lambda item: item[0]):
        path = arch.module_path(layer, module)
        _check_module(name, path, a, b, arch.linear_shape(module), config, max_rank)
        modules[(layer, module)] = ModuleLoRA(a=a, b=b, scale=config.scale_for(path))
    _check_config_agrees(name, config, set(modules), arch)
    log.debug("adapter %s read from %s: %d modules, rank %d", name, folder, len(modules),
              max(m.rank for m in modules.values()))
    return AdapterWeights(name=name, modules=modules, source=str(folder), sha256=sha256, config=config.raw)


WEIGHTS_HEADER_SLACK = 1 << 20
"""Room for the safetensors header (names, shapes, offsets, metadata) beside the tensors' bytes."""


def max_weights_bytes(config: PeftLoraConfig, arch: ModelArch, max_rank: int) -> int:
    """The largest adapter_model.safetensors a valid adapter with this config can be on this base and
    server: every layer it may adapt x every projection its target_modules may select x the largest
    rank it names (capped at `max_rank`: more is refused anyway) x 8 bytes (float64), plus the header.
    Files past this are refused before they are copied or read."""
    targets = config.target_modules
    modules = set(LINEAR_MODULES)
    if isinstance(targets, tuple):
        named = {t.rsplit(".", 1)[-1] for t in targets} & modules
        modules = named or modules  # none named: let validation say what is wrong
    layers = config.raw.get("layers_to_transform")
    num_layers = arch.num_layers if layers is None else len({layers} if isinstance(layers, int) else set(layers))
    rank = min(max([config.r, *config.rank_pattern.values()]), max_rank)
    per_layer = sum(sum(arch.linear_shape(module)) for module in modules)
    return min(num_layers, arch.num_layers) * per_layer * rank * 8 + WEIGHTS_HEADER_SLACK


def rank_over_max(config: PeftLoraConfig, max_rank: int, name: str) -> AdapterMismatch | None:
    """Why a weights file past max_weights_bytes is refused, when its config asks for more rank than the
    server takes (the size bound counts at most max_rank)."""
    rank = max([config.r, *config.rank_pattern.values()])
    if rank <= max_rank:
        return None
    return AdapterMismatch(f"adapter {name!r}: adapter_config.json gives rank {rank} (r / rank_pattern), more than "
                           f"this server's max_rank {max_rank}")


def _weights_file(folder: Path, name: str, shown_as: str | None = None) -> Path:
    path = folder / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    shown_folder = str(folder) if shown_as is None else (shown_as or "the upload")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(
            f"adapter {name!r}: {shown_folder} has only pickle weights ({', '.join(pickles)}); pickle weights are "
            f"refused (loading them can run code): convert to safetensors ({ADAPTER_WEIGHTS}), e.g. "
            "PeftModel.from_pretrained(...).save_pretrained(out, safe_serialization=True)")
    raise InvalidAdapter(f"adapter {name!r}: {shown_path(folder, ADAPTER_WEIGHTS, shown_as)} not found")


def _read_tensors(path: Path, arch: ModelArch, name: str,
                  shown: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Check every key against the base, then read the (A, B) pairs as owned CPU tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            parsed = _parse_keys(keys, arch, name)
            # clone: get_tensor returns a view of the memory-mapped file, which may change under us
            read = {k: f.get_tensor(k).clone() for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise InvalidAdapter(f"adapter {name!r}: {shown} is not a valid safetensors file "
                             f"({str(exc).replace(str(path), shown)})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, lora_key in parsed.items():
        pairs.setdefault((lora_key.layer, lora_key.module), {})[lora_key.part] = read[key]
    return {target: (parts["A"], parts["B"]) for target, parts in pairs.items()}


def _parse_keys(keys: list[str], arch: ModelArch, name: str) -> dict:
    if not keys:
        raise InvalidAdapter(f"adapter {name!r}: {ADAPTER_WEIGHTS} holds no tensors")
    embedding = [k for k in keys if is_embedding_key(k)]
    if embedding:
        raise InvalidAdapter(f"adapter {name!r}: adapters on embeddings/lm_head are not supported "
                             f"(tensors {_listed(embedding)})")
    parsed = {k: parse_key(k) for k in keys}
    foreign = sorted({lora_target(k) for k, v in parsed.items() if v is None and lora_target(k)})
    if foreign:
        raise AdapterMismatch(
            f"adapter {name!r}: targets {_listed(foreign)}, which this base ({arch.model_type}) does not adapt; "
            f"supported: model.layers.N.self_attn.{{q,k,v,o}}_proj and model.layers.N.mlp.{{gate,up,down}}_proj")
    unknown = [f"{k!r}" + next((hint for frag, hint in _KEY_HINTS.items() if frag in k), "")
               for k, v in parsed.items() if v is None]
    if unknown:
        raise InvalidAdapter(f"adapter {name!r}: unexpected tensors {_listed(unknown, quote=False)}; only "
                             f"lora_A.weight and lora_B.weight of {', '.join(LINEAR_MODULES)} are supported")
    too_deep = sorted({v.layer for v in parsed.values() if v.layer >= arch.num_layers})
    if too_deep:
        raise AdapterMismatch(f"adapter {name!r}: has weights for layer {too_deep[-1]}, but the base model has "
                              f"{arch.num_layers} layers (0..{arch.num_layers - 1})")
    parts: dict[tuple[int, str], set[str]] = {}
    for v in parsed.values():
        parts.setdefault((v.layer, v.module), set()).add(v.part)
    for (layer, module), present in sorted(parts.items()):
        if present != {"A", "B"}:
            (have,), (lack,) = present, {"A", "B"} - present
            raise InvalidAdapter(f"adapter {name!r}: {arch.module_path(layer, module)} has lora_{have}.weight "
                                 f"but no lora_{lack}.weight")
    return parsed


def _check_module(name: str, path: str, a: torch.Tensor, b: torch.Tensor, in_out: tuple[int, int],
                  config: PeftLoraConfig, max_rank: int) -> None:
    """Values first (InvalidAdapter), then fit to the base and the server (AdapterMismatch)."""
    for part, t in (("lora_A", a), ("lora_B", b)):
        tensor = f"{path}.{part}.weight"
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"adapter {name!r}: {tensor} has dtype {t.dtype}, expected one of "
                                 f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
        if t.ndim != 2:
            raise InvalidAdapter(f"adapter {name!r}: {tensor} has shape {_shape(t.shape)}, expected a 2-D matrix")
        if t.numel() == 0:
            raise InvalidAdapter(f"adapter {name!r}: {tensor} is empty (shape {_shape(t.shape)})")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidAdapter(f"adapter {name!r}: {tensor} has {bad} non-finite values (NaN or inf)")
    in_features, out_features = in_out
    rank = a.shape[0]
    base_hint = "; trained for a different base model?" + (
        f" (its base_model_name_or_path: {config.base_model_name_or_path!r})" if config.base_model_name_or_path else "")
    if a.shape[1] != in_features:
        raise AdapterMismatch(f"adapter {name!r}: {path}.lora_A.weight has shape {_shape(a.shape)}, expected "
                              f"{_shape((rank, in_features))} ([r, in_features] for this base){base_hint}")
    if b.shape[0] != out_features:
        raise AdapterMismatch(f"adapter {name!r}: {path}.lora_B.weight has shape {_shape(b.shape)}, expected "
                              f"{_shape((out_features, rank))} ([out_features, r] for this base){base_hint}")
    if b.shape[1] != rank:
        raise AdapterMismatch(f"adapter {name!r}: {path}: rank of lora_A ({rank}) and lora_B ({b.shape[1]}) "
                              f"disagree (shapes {_shape(a.shape)} and {_shape(b.shape)})")
    expected_rank = config.rank_for(path)
    if rank != expected_rank:
        raise AdapterMismatch(f"adapter {name!r}: {path} has rank {rank}, but adapter_config.json gives "
                              f"r={expected_rank} for it (r / rank_pattern)")
    if rank > max_rank:
        raise AdapterMismatch(f"adapter {name!r}: {path} has rank {rank}, more than this server's "
                              f"max_rank {max_rank}")


def _check_config_agrees(name: str, config: PeftLoraConfig, present: set[tuple[int, str]], arch: ModelArch) -> None:
    """adapter_config.json must describe the tensors: every adapted module is one its target_modules
    selects (PEFT's rule: a list of names matched as dotted suffixes, or one regex matched in full),
    every projection the list names has tensors, and layers stay within layers_to_transform."""
    targets = config.target_modules
    paths = sorted(arch.module_path(layer, module) for layer, module in present)
    if isinstance(targets, tuple):
        unselected = [p for p in paths if not any(p == t or p.endswith("." + t) for t in targets)]
    elif isinstance(targets, str) and targets != "all-linear":
        unselected = [p for p in paths if not pattern_matches(targets, p, full=True)]
    else:  # all-linear, or no target_modules recorded: every projection is selectable
        unselected = []
    if unselected:
        named = _listed(list(targets) if isinstance(targets, tuple) else [targets])
        raise InvalidAdapter(f"adapter {name!r}: {ADAPTER_WEIGHTS} has tensors for {_listed(unselected)}, which "
                             f"adapter_config.json's target_modules ({named}) does not select; the config and the "
                             "weights disagree")
    if isinstance(targets, tuple):
        named = {t.rsplit(".", 1)[-1] for t in targets} & set(LINEAR_MODULES)
        missing = sorted(named - {module for _, module in present})
        if missing:
            raise InvalidAdapter(f"adapter {name!r}: adapter_config.json's target_modules names {_listed(missing)}, "
                                 f"but {ADAPTER_WEIGHTS} has no tensors for them; the config and the weights disagree")
    layers = config.raw.get("layers_to_transform")
    if layers is not None:
        allowed = {layers} if isinstance(layers, int) else set(layers)
        outside = sorted({layer for layer, _ in present} - allowed)
        if outside:
            raise InvalidAdapter(f"adapter {name!r}: {ADAPTER_WEIGHTS} has tensors for layer {outside[0]}, outside "
                                 f"adapter_config.json's layers_to_transform {_listed(sorted(allowed), quote=False)}")


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _listed(items: list, quote: bool = True) -> str:
    """The first few items (each cut to 80 characters), and how many more."""
    cut = [(repr(i) if quote else str(i)) for i in items[:_MAX_LISTED]]
    shown = ", ".join(c if len(c) <= 80 else c[:80] + "..." for c in cut)
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
