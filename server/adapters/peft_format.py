"""The PEFT LoRA format, read in one place: file names, adapter_config.json, tensor keys, scaling.

PEFT is the contract (peft/tuners/lora/{config,model,layer}.py): rank and alpha per module come
from `rank_pattern` / `alpha_pattern` matched with `peft.utils.other.get_pattern_key`, and the
scale is alpha / r, or alpha / sqrt(r) with rsLoRA. Nothing here knows about slots or devices.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import regex as _regex

from ..errors import InvalidAdapter
from ..model.arch import ATTENTION_MODULES, LINEAR_MODULES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json is a few KB; a larger one is refused before it is parsed."""
MAX_JSON_DEPTH = 16
"""Nesting of adapter_config.json (PEFT writes 3 levels at most); deeper is refused before parsing."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files we refuse to open: torch.load unpickles, which can run arbitrary code."""
KEY_PREFIX = "base_model.model."
"""PeftModel -> LoraModel -> the HF model: every saved key starts with this."""
EMBEDDING_MODULES = ("embed_tokens", "lm_head")

_LORA_WEIGHT_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight")
_LAYER_PATH = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)")

# PEFT options whose forward differs from plain y += scale * B(A(x)), or that save tensors other
# than lora_A / lora_B, or that need a different base: (config field, why we refuse).
_REFUSED_FLAGS = (
    ("use_dora", "DoRA (use_dora) adds a magnitude vector and a weight-norm term"),
    ("lora_bias", "lora_bias adds a bias to lora_B"),
    ("use_qalora", "QALoRA (use_qalora) pools the input before lora_A"),
    ("fan_in_fan_out", "fan_in_fan_out=True stores transposed (Conv1D) weights"),
)
_REFUSED_VALUES = (
    ("modules_to_save", "modules_to_save ships full copies of base modules"),
    ("target_parameters", "target_parameters adapts nn.Parameters, not linear modules"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens) activates only after invocation tokens"),
    ("trainable_token_indices", "trainable_token_indices changes embedding rows"),
    ("layer_replication", "layer_replication changes the base model's layer stack"),
    ("megatron_config", "megatron_config targets Megatron parallel layers"),
    ("monteclora_config", "MonteCLoRA (monteclora_config) samples the LoRA weights"),
    ("use_bdlora", "BD-LoRA (use_bdlora) uses block-diagonal factors"),
    ("arrow_config", "Arrow (arrow_config) routes between adapters"),
    ("kasa_config", "KaSA (kasa_config) truncates the base weights and adds lora_diag"),
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
"""init_lora_weights that rewrite the base weights; PEFT saves init_lora_weights=True once converted."""


@dataclass(frozen=True, slots=True)
class PeftLoraConfig:
    """The fields of adapter_config.json that decide LoRA math; `raw` keeps the whole file."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str | None
    """A list of module-name suffixes, or one regex (PEFT's two forms)."""
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    raw: dict

    def rank_for(self, module_path: str) -> int:
        """r of one module, e.g. 'model.layers.3.self_attn.q_proj', as PEFT's _create_and_replace picks it."""
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern, module_path), self.r)

    def alpha_for(self, module_path: str) -> float:
        return self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, module_path), self.lora_alpha)

    def scale_for(self, module_path: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (peft LoraLayer.update_layer)."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


PATTERN_TIMEOUT_SECONDS = 0.05
"""Budget of one config regex against one module name. The patterns come from the adapter's author:
`(.*)*x` takes Python's re minutes (holding the GIL, so the whole server), hence the `regex`
module, which stops a match after this long (and releases the GIL while it runs)."""


def pattern_matches(pattern: str, text: str, *, full: bool) -> bool:
    """re.fullmatch / re.match of a pattern from adapter_config.json, time-bounded; a pattern that
    runs out of time raises InvalidAdapter naming it."""
    try:
        found = (_regex.fullmatch if full else _regex.match)(pattern, text, timeout=PATTERN_TIMEOUT_SECONDS,
                                                                 concurrent=True)
    except TimeoutError:
        raise InvalidAdapter(f"adapter_config.json: the pattern {_shown_value(pattern)} takes too long to match "
                             f"{text!r} (over {PATTERN_TIMEOUT_SECONDS} s); simplify it") from None
    except (_regex.error, RecursionError, OverflowError) as exc:
        raise InvalidAdapter(f"adapter_config.json: {_shown_value(pattern)} is not a valid regex ({exc})") from None
    return found is not None


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The first pattern that matches the end of key_to_match at a dot boundary, else key_to_match.

    Same as peft.utils.other.get_pattern_key: patterns are regexes, dict order decides ties.
    """
    for key in pattern_keys:
        if pattern_matches(rf"(.*\.)?({key})$", key_to_match, full=False):
            return key
    return key_to_match


def shown_path(folder: str | Path, file_name: str, shown_as: str | None) -> str:
    """How a file is named in messages: under `shown_as` (the caller's own name for the folder: a
    registered source; "" for an upload, which has only file names) instead of where the server keeps it."""
    if shown_as is None:
        return str(Path(folder) / file_name)
    return str(Path(shown_as) / file_name) if shown_as else file_name


def _shown_value(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.S)
"""A JSON string, or an unterminated one up to the end: linear even on hostile text."""
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest nesting of [] / {} in a JSON text (strings skipped), without parsing it; linear time."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def load_bounded_json(path: Path, what: str, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """json.loads of a small file, refusing (ValueError, naming `what`) before parsing: files over
    `max_bytes`, anything that is not a regular file, nesting deeper than `max_depth`."""
    if not path.is_file():
        raise FileNotFoundError(path) if not path.exists() else ValueError(f"{what} is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what} has {size} bytes, more than the {max_bytes} allowed")
    with open(path, "rb") as handle:
        text = handle.read(max_bytes + 1).decode("utf-8")
    if len(text) > max_bytes:
        raise ValueError(f"{what} has more than the {max_bytes} bytes allowed")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep, more than the {max_depth} allowed")
    return json.loads(text)


def read_lora_config(folder: str | Path, name: str, shown_as: str | None = None) -> PeftLoraConfig:
    """Parse adapter_config.json (size- and depth-bounded); raise InvalidAdapter naming the adapter and the
    field. `shown_as`: see shown_path."""
    path = Path(folder) / ADAPTER_CONFIG
    shown = shown_path(folder, ADAPTER_CONFIG, shown_as)
    try:
        raw = load_bounded_json(path, shown)
    except FileNotFoundError:
        raise InvalidAdapter(f"adapter {name!r}: {shown} not found (a PEFT adapter folder needs "
                             f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidAdapter(f"adapter {name!r}: {shown} is not valid JSON ({detail})") from None
    path = shown
    if not isinstance(raw, dict):
        raise InvalidAdapter(f"adapter {name!r}: {path} must hold a JSON object, got {type(raw).__name__}")
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type is {_shown_value(raw.get('peft_type'))}, only 'LORA' is supported")
    r = raw.get("r")
    if not _is_int(r) or r < 1:
        problems.append(f"r must be a positive integer, got {_shown_value(r)}")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        problems.append(f"lora_alpha must be a number, got {_shown_value(alpha)}")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for field_name, pattern, ok, want in (("rank_pattern", rank_pattern, lambda v: _is_int(v) and v >= 1,
                                           "a positive integer"),
                                          ("alpha_pattern", alpha_pattern, _is_number, "a number")):
        if not isinstance(pattern, dict):
            problems.append(f"{field_name} must be an object, got {_shown_value(pattern)}")
            continue
        for key, value in pattern.items():
            if not ok(value):
                problems.append(f"{field_name}[{_shown_value(key)}] must be {want}, got {_shown_value(value)}")
            try:
                _regex.compile(key)
            except (_regex.error, RecursionError, OverflowError) as exc:
                problems.append(f"{field_name} key {_shown_value(key)} is not a valid regex ({exc})")
    targets = raw.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules must be a list of names or a regex string, got {_shown_value(targets)}")
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            _regex.compile(targets)
        except (_regex.error, RecursionError, OverflowError) as exc:
            problems.append(f"target_modules {_shown_value(targets)} is not a valid regex ({exc})")
    layers = raw.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(x) for x in layers))):
        problems.append(f"layers_to_transform must be a layer index or a list of them, got {_shown_value(layers)}")
    if problems:
        raise InvalidAdapter(f"adapter {name!r}: {path}: " + "; ".join(problems))
    return PeftLoraConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=tuple(targets) if isinstance(targets, list) else targets,
        rank_pattern=dict(rank_pattern), alpha_pattern=dict(alpha_pattern),
        base_model_name_or_path=raw.get("base_model_name_or_path"), raw=raw)


def base_model_warning(named, base_names: tuple[str, ...]) -> str | None:
    """Why adapter_config.json's base_model_name_or_path may not be this server's base (None: it is).

    Equal ignoring case and a trailing '/', or the same last path component (a hub id beside a local
    folder of that model). Shapes are checked separately: this catches another base of the same shape.
    """
    def norm(text: str) -> str:
        return text.strip().rstrip("/").lower()

    bases = [norm(b) for b in base_names if b]
    if not isinstance(named, str) or not named.strip():
        return "adapter_config.json names no base model (base_model_name_or_path), so it may have been trained " \
               "for another base of the same shape"
    given = norm(named)
    if given in bases or given.rsplit("/", 1)[-1] in {b.rsplit("/", 1)[-1] for b in bases}:
        return None
    return (f"adapter_config.json names base model {_shown_value(named)}, not this server's "
            f"{base_names[0]!r}; its shapes fit, but it was trained for another model")


def unsupported_features(raw: dict) -> list[str]:
    """Why this adapter_config.json asks for more than plain LoRA on linear projections (empty: fine)."""
    reasons = [why for key, why in _REFUSED_FLAGS if raw.get(key) is True]
    reasons += [why for key, why in _REFUSED_VALUES if raw.get(key)]
    if raw.get("bias", "none") != "none":
        reasons.append(f"bias={raw['bias']!r} trains base biases (only 'none' is supported)")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        reasons.append(f"init_lora_weights={raw['init_lora_weights']!r} needs a modified base model; save it "
                       "with path_initial_model_for_weight_conversion to get a plain LoRA")
    targets = raw.get("target_modules")
    embedding = [t for t in targets if t.rsplit(".", 1)[-1] in EMBEDDING_MODULES] if isinstance(targets, list) else []
    if embedding:
        reasons.append(f"adapters on embeddings/lm_head are not supported (target_modules has {embedding})")
    return reasons


class LoraKey(NamedTuple):
    """A parsed tensor key; compares equal to (layer, module, part)."""

    layer: int
    module: str
    """One of LINEAR_MODULES."""
    part: str
    """'A' (lora_A.weight, [r, in]) or 'B' (lora_B.weight, [out, r])."""


def parse_key(key: str) -> LoraKey | None:
    """base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight -> LoraKey, else None."""
    m = _LORA_WEIGHT_KEY.fullmatch(key)
    path = m and _LAYER_PATH.fullmatch(m["path"])
    if not path or path["module"] not in LINEAR_MODULES:
        return None
    expected_block = "self_attn" if path["module"] in ATTENTION_MODULES else "mlp"
    if path["block"] != expected_block:
        return None
    return LoraKey(int(path["layer"]), path["module"], m["part"])


def lora_target(key: str) -> str | None:
    """The module path a lora_A/lora_B weight key adapts (any module), else None."""
    m = _LORA_WEIGHT_KEY.fullmatch(key)
    return m["path"] if m else None


def is_embedding_key(key: str) -> bool:
    """Keys PEFT writes for LoRA on embed_tokens / lm_head (lora_embedding_A, lm_head.lora_A, base copies)."""
    parts = key.split(".")
    return "lora_embedding_A" in parts or "lora_embedding_B" in parts or any(
        p in EMBEDDING_MODULES for p in parts)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

