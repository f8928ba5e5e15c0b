"""`export merge` end to end: validate, merge, write the HF checkpoint (optionally NF4), atomically."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .base import BaseModel
from .hf import DTYPES, MAX_SHARD_BYTES, TOKENIZER_FILES, write_checkpoint
from .merge import MergeRecipe, load_adapters, merged_tensors, start_report, trained_on_warnings
from .outputs import INFO_FILE, staged_output, tree_bytes, write_json

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "nf4")


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    recipe: MergeRecipe
    out: Path
    dtype: str = "bf16"
    """Of the merged weights: fp32, bf16 or fp16 (the merge itself runs in fp32)."""
    quantize: str = "none"
    """none, or nf4: re-quantize on purpose, the error it adds is measured and reported."""
    force: bool = False
    max_shard_bytes: int = MAX_SHARD_BYTES

    def __post_init__(self):
        from loraplex.server.errors import InvalidArgument

        if self.max_shard_bytes < 1:
            raise InvalidArgument(f"max shard size must be positive, got {self.max_shard_bytes} bytes")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidArgument(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")


def export_checkpoint(base: BaseModel, request: CheckpointRequest) -> dict:
    """Write the merged checkpoint to request.out; returns what export_info.json records."""
    started = time.perf_counter()
    out = Path(request.out)
    with staged_output(out, request.force) as stage:
        adapters = load_adapters(request.recipe, base)  # every validation error before any weight is written
        report = start_report(request.recipe, adapters)
        report.warnings.extend(trained_on_warnings(adapters, base))
        for warning in report.warnings:
            log.warning("%s", warning)
        extra = {"loraplex_export": {"base": base.model_id, "base_sha256": base.sha256,
                                     "merge": request.recipe.to_dict()}}
        tensors = merged_tensors(base, adapters, request.recipe, report)
        quantization = None
        if request.quantize == "nf4":
            from .quantize import quantize_nf4

            full = stage / ".full-precision"
            full.mkdir()
            write_checkpoint(base, tensors, full, request.dtype, extra, request.max_shard_bytes)
            quantization = quantize_nf4(full, stage, request.dtype).to_dict()
            for name in TOKENIZER_FILES:
                if (full / name).is_file():
                    shutil.copy2(full / name, stage / name)
            shutil.rmtree(full)
        else:
            write_checkpoint(base, tensors, stage, request.dtype, extra, request.max_shard_bytes)
        info = {"format": "hf", "base": {"path": str(base.path), "model_id": base.model_id, "sha256": base.sha256},
                "merge": {"recipe": report.recipe, "adapters": report.adapters,
                          "num_tensors_changed": report.num_tensors_changed, "max_abs_delta": report.max_abs_delta,
                          "seconds": round(report.seconds, 3), "warnings": report.warnings},
                "dtype": request.dtype, "quantization": quantization, "bytes": tree_bytes(stage),
                "seconds": round(time.perf_counter() - started, 3)}
        write_json(stage / INFO_FILE, info)
    return info
