"""`export batch`: run a manifest's items (in worker processes), resumably, recording everything in results.json.

Each item merges its adapters once and writes its formats to <out>/<item>/<format>, every output
staged and renamed into place when complete. results.json is rewritten atomically after every item,
so an interrupted batch leaves a true record: on the next run an output is skipped when its folder
still hashes to the recorded sha256 and its recipe key (base, adapter contents and options) is
unchanged; anything else is redone. A failing item is recorded with its error; the others go on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.errors import LoraplexError

from .base import BaseModel, resolve_base
from .manifest import FORMATS, ExportItem, Manifest, shard
from .outputs import INFO_FILE, file_sha256, tree_bytes, tree_sha256, write_json

log = logging.getLogger(__name__)
RESULTS_VERSION = 1
TENSORRT_FILES = ("trtexec.sh", "model.plan", "model.plan.json", "timing.cache")
"""What `export tensorrt` may add next to an ONNX: not part of the ONNX output's content hash."""


@dataclass(frozen=True, slots=True)
class BatchOptions:
    shard_index: int = 0
    shard_count: int = 1
    progress: bool = True
    threads_per_worker: int | None = None
    """torch / onnxruntime threads in each worker (default: CPU cores / workers)."""


@dataclass(frozen=True, slots=True)
class BatchSummary:
    results_path: Path
    done: int
    skipped: int
    failed: int

    @property
    def ok(self) -> bool:
        return self.failed == 0


def results_path(out: Path, options: BatchOptions) -> Path:
    if options.shard_count == 1:
        return out / "results.json"
    return out / f"results-shard-{options.shard_index}-of-{options.shard_count}.json"


def run_batch(manifest: Manifest, options: BatchOptions = BatchOptions()) -> BatchSummary:
    items = shard(manifest.items, options.shard_index, options.shard_count)
    out = manifest.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .errors import ExportError

        raise ExportError(f"output {out}: cannot create it ({exc.strerror or exc})") from None
    base = resolve_base(manifest.base)
    path = results_path(out, options)
    results = _previous(path)
    results.update({"version": RESULTS_VERSION, "manifest": str(manifest.path), "manifest_sha256": manifest.sha256,
                    "base": {"path": str(base.path), "model_id": base.model_id, "sha256": base.sha256},
                    "shard": [options.shard_index, options.shard_count]})
    results.setdefault("items", {})
    workers = min(manifest.workers, max(1, len(items)))
    threads = options.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    jobs = [(item, base, out, results["items"].get(item.name, {}), threads) for item in items]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="export", unit="item", disable=not options.progress, file=sys.stderr)

    def record(entry: dict) -> None:
        results["items"][entry["name"]] = entry
        counts[entry["status"]] += 1
        write_json(path, results)
        bar.set_postfix(failed=counts["failed"], skipped=counts["skipped"])
        bar.update(1)
        if entry["status"] == "failed":
            bar.write(f"export: item {entry['name']!r} failed: {entry['error']}", file=sys.stderr)

    try:
        if workers == 1:
            for job in jobs:
                record(run_item(*job))
        else:
            run_in_workers(run_item, jobs, workers, record, lambda job: _died_entry(job[0]))
    finally:
        bar.close()
    return BatchSummary(path, counts["done"], counts["skipped"], counts["failed"])


def run_in_workers(fn, jobs: list[tuple], workers: int, record, died) -> None:
    """record(fn(*job)) for every job, in `workers` spawned processes.

    A worker that dies (killed for memory, a segfault) breaks the whole pool and every job still in it;
    those jobs are rerun one process each, so only the job that kills its process again is lost, and it is
    recorded as died(job): the other items go on.
    """
    for job in _run_in_pool(fn, jobs, workers, record):
        if _run_in_pool(fn, [job], 1, record):
            record(died(job))


def _run_in_pool(fn, jobs: list[tuple], workers: int, record) -> list[tuple]:
    """The jobs lost to a worker that died; the others' results went to record."""
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    lost = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for future in as_completed(futures):
            try:
                record(future.result())
            except BrokenProcessPool:
                lost.append(futures[future])
    return lost


def _died_entry(item: ExportItem) -> dict:
    return {"name": item.name, "status": "failed", "item": item.to_dict(), "outputs": {},
            "error": "its worker process died (killed for memory, or crashed); see the system log", "seconds": None}


def recipe_key(item: ExportItem, base: BaseModel, fmt: str) -> str:
    """sha256 of everything an output depends on: base and adapter contents, options, format."""
    parts = []
    for spec in item.recipe.adapters:
        folder = Path(spec.path)
        parts.append([_hash_or_missing(folder / "adapter_model.safetensors"),
                      _hash_or_missing(folder / "adapter_config.json")])
    key = {"v": RESULTS_VERSION, "base": base.sha256, "adapters": parts, "item": item.to_dict(), "format": fmt}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_item(item: ExportItem, base: BaseModel, out: Path, previous: dict, threads: int) -> dict:
    """Produce (or skip) every format of one item; never raises: failures are returned as the entry."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    folder = out / item.name
    entry = {"name": item.name, "status": "done", "item": item.to_dict(), "outputs": {}, "error": None}
    old_outputs = previous.get("outputs", {})
    try:
        _clean_partials(folder)
        keys = {fmt: recipe_key(item, base, fmt) for fmt in item.formats}
        entry["adapters"] = [{"path": s.path, "weight": s.weight, "sha256": k[0], "config_sha256": k[1]}
                             for s, k in zip(item.recipe.adapters, _adapter_hashes(item))]
        pending = []
        for fmt in item.formats:
            old = old_outputs.get(fmt)
            if old and old.get("recipe_key") == keys[fmt] and _unchanged(folder / _subdir(fmt), old):
                entry["outputs"][fmt] = {**old, "skipped": True}
            else:
                pending.append(fmt)
        if pending:
            _produce(item, base, folder, pending, keys, old_outputs, entry)
        else:
            entry["status"] = "skipped"
    except LoraplexError as exc:
        entry.update(status="failed", error=str(exc))
    except Exception as exc:  # a bug, or an error from a library: record it, let the other items go on
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


def _produce(item: ExportItem, base: BaseModel, folder: Path, pending: list[str], keys: dict, old: dict,
             entry: dict) -> None:
    from .checkpoint import CheckpointRequest, export_checkpoint
    from .onnx import OnnxRequest, export_onnx
    from .tensorrt import TrtRequest, build_engine

    folder.mkdir(parents=True, exist_ok=True)
    pending = sorted(pending, key=FORMATS.index)  # hf before onnx before tensorrt (which reads the onnx)
    scratch = folder / ".work"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        for fmt in pending:
            started = time.perf_counter()
            target = folder / _subdir(fmt)
            if fmt in ("hf", "hf-nf4"):
                info = export_checkpoint(base, CheckpointRequest(item.recipe, target, item.dtype,
                                                                 "nf4" if fmt == "hf-nf4" else "none", force=True))
            elif fmt in ("onnx", "onnx-int4"):
                source = scratch / "merged-fp32"
                if not source.is_dir():  # one full-precision merge feeds every ONNX format of the item
                    export_checkpoint(base, CheckpointRequest(item.recipe, source, "fp32", force=True))
                int4 = fmt == "onnx-int4"
                info = export_onnx(OnnxRequest(source, target, "fp32" if int4 else item.onnx_dtype, int4,
                                               item.block_size, validate_tokens=item.validate_tokens,
                                               exporter=item.exporter, force=True),
                                   source={"base_sha256": base.sha256, "merge": item.recipe.to_dict()})
            else:
                info = _tensorrt(item, folder, build_engine, TrtRequest)
            entry["outputs"][fmt] = _output_record(fmt, target, info, keys[fmt], old.get(fmt), started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tensorrt(item: ExportItem, folder: Path, build_engine, TrtRequest) -> dict:
    from .errors import TensorRTUnavailable

    request = TrtRequest(folder / "onnx", item.trt_profile, item.workspace_mib,
                         engine=folder / "tensorrt" / "model.plan", timing_cache=folder / "tensorrt" / "timing.cache")
    (folder / "tensorrt").mkdir(exist_ok=True)
    try:
        return build_engine(request)
    except TensorRTUnavailable:
        shutil.rmtree(folder / "tensorrt", ignore_errors=True)
        raise


def _output_record(fmt: str, target: Path, info: dict, key: str, old: dict | None, started: float) -> dict:
    validation = info.get("validation") or {}
    figures = {k: validation.get(k) for k in ("kind", "runnable", "reason", "logits_max_abs_diff", "tolerance",
                                              "greedy_tokens", "greedy_equal", "passed", "versus_full_precision")
               if k in validation}
    return {"path": str(target), "sha256": tree_sha256(target, TENSORRT_FILES),
            "bytes": tree_bytes(target, TENSORRT_FILES), "recipe_key": key,
            "validation": figures or None, "quantization": info.get("quantization"),
            "seconds": round(time.perf_counter() - started, 3), "finished_at": time.time(),
            "runs": (old or {}).get("runs", 0) + 1, "skipped": False}


def _subdir(fmt: str) -> str:
    return fmt


def _unchanged(target: Path, old: dict) -> bool:
    if target.name == "tensorrt":
        return (target / "model.plan").is_file() and tree_sha256(target) == old.get("sha256")
    return (target / INFO_FILE).is_file() and tree_sha256(target, TENSORRT_FILES) == old.get("sha256")


def _adapter_hashes(item: ExportItem) -> list[tuple[str | None, str | None]]:
    return [(_hash_or_missing(Path(s.path) / "adapter_model.safetensors"),
             _hash_or_missing(Path(s.path) / "adapter_config.json")) for s in item.recipe.adapters]


def _hash_or_missing(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def _clean_partials(folder: Path) -> None:
    """Stages left by an interrupted run (`.<format>.partial-*`, `.work`) are garbage: remove them."""
    if folder.is_dir():
        for leftover in folder.iterdir():
            if leftover.name.startswith(".") and (".partial-" in leftover.name or leftover.name == ".work"):
                shutil.rmtree(leftover, ignore_errors=True)


def _previous(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("%s is unreadable: starting a fresh record", path)
        return {}
    return data if isinstance(data, dict) and data.get("version") == RESULTS_VERSION else {}
