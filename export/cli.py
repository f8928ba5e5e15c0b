"""`loraplex export ...`: merge adapters into the base, export ONNX / TensorRT, run manifests of many exports.

The lead wires it into `loraplex`: add_export_parser(subparsers) adds `export`; run_export(args)
returns the exit code. User errors print one line on stderr (no traceback).

Exit codes: 0 done; 1 internal error (a bug: traceback printed); 2 bad input (adapter, base, manifest,
output path); 3 tensorrt is not installed (trtexec.sh written next to the ONNX); 4 ONNX validation
failed (the export is kept aside as <out>.invalid); 5 a batch finished with failed items; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplex.server.errors import LoraplexError

from .errors import EXIT_BATCH_FAILURES, EXIT_INTERNAL, EXIT_OK, exit_code_of

EXIT_CODES = ("exit codes: 0 done; 1 internal error; 2 bad input (adapter, base, manifest, output); "
              "3 tensorrt not installed (trtexec.sh written); 4 onnx validation failed (kept as <out>.invalid); "
              "5 batch finished with failed items; 130 interrupted")
METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def _merge_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--base", default=None,
                        help="HF folder or .gguf of the base (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH", required=required,
                        help="PEFT adapter folder; repeat for a weighted set")
    parser.add_argument("--weights", default=None, help="comma-separated weights, one per --adapter (default: 1 each)")
    parser.add_argument("--method", default="linear", choices=METHODS,
                        help="linear is exact; ties / dare_* follow PEFT's merge_utils (dense, no SVD)")
    parser.add_argument("--density", type=float, default=None, help="fraction kept by ties / dare_* (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's drop masks")
    parser.add_argument("--base-weights", default="checkpoint", choices=["checkpoint", "nf4"],
                        help="merge into the checkpoint's weights, or into them as the NF4 server computes with them")
    parser.add_argument("--allow-mixed-bases", action="store_true",
                        help="merge adapters whose adapter_config.json names different bases, or another base "
                             "than --base")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser("export", help="merge adapters; export HF checkpoints, ONNX and TensorRT engines",
                                   description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    jobs = export.add_subparsers(dest="export_command", required=True, metavar="JOB")

    merge = jobs.add_parser("merge", help="merge adapter(s) into the base: an HF checkpoint", epilog=EXIT_CODES)
    _merge_args(merge)
    merge.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="of the merged weights")
    merge.add_argument("--quantize", default="none", choices=["none", "nf4"],
                       help="re-quantize the merged model to NF4 (adds error, which is measured and printed)")
    merge.add_argument("--max-shard-mb", type=float, default=5120, help="largest safetensors shard (default 5 GiB)")
    merge.add_argument("--out", required=True, help="output folder (written whole or not at all)")
    merge.add_argument("--force", action="store_true", help="replace an existing output")

    onnx = jobs.add_parser("onnx", help="ONNX decoder with KV cache, validated with onnxruntime", epilog=EXIT_CODES)
    onnx.add_argument("--model", default=None,
                      help="a full-precision HF checkpoint (e.g. from `export merge`); or give --adapter to merge first")
    _merge_args(onnx, required=False)
    onnx.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                      help="bf16 exports but onnxruntime's CPU provider cannot run it (not validated)")
    onnx.add_argument("--int4", action="store_true", help="4-bit weights via onnxruntime's MatMulNBits quantizer")
    onnx.add_argument("--block-size", type=int, default=32, help="int4 quantization block")
    onnx.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    onnx.add_argument("--external-data", default="auto", choices=["auto", "always", "never"],
                      help="weights in model.onnx.data (auto: past 2 GB)")
    onnx.add_argument("--validate-tokens", type=int, default=8, help="greedy tokens compared with PyTorch")
    onnx.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check")
    onnx.add_argument("--out", required=True)
    onnx.add_argument("--force", action="store_true")

    trt = jobs.add_parser("tensorrt", help="TensorRT engine from an ONNX export (or the trtexec command)",
                          epilog=EXIT_CODES)
    trt.add_argument("onnx", help="an `export onnx` output folder or its model.onnx")
    trt.add_argument("--engine", default=None, help="engine path (default: model.plan next to the ONNX)")
    trt.add_argument("--timing-cache", default=None, help="default: timing.cache next to the ONNX")
    trt.add_argument("--workspace-mib", type=int, default=4096)
    for name, default in (("min-batch", 1), ("opt-batch", 1), ("max-batch", 8), ("opt-seq", 1), ("max-seq", 512),
                          ("opt-context", 512), ("max-context", 2048)):
        trt.add_argument(f"--{name}", type=int, default=default)

    run = jobs.add_parser("run-onnx", help="smoke generation with an ONNX export", epilog=EXIT_CODES)
    run.add_argument("onnx", help="an `export onnx` output folder")
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--raw", action="store_true", help="do not apply the chat template")

    batch = jobs.add_parser("batch", help="many exports from a TOML/JSON manifest, resumable", epilog=EXIT_CODES)
    batch.add_argument("manifest")
    batch.add_argument("--out", default=None, help="output folder (default: the manifest's `out`)")
    batch.add_argument("--workers", type=int, default=None, help="parallel processes (default: the manifest's)")
    batch.add_argument("--shard", default=None, metavar="K/N", help="run items K, K+N, ... (a Kubernetes Job index)")
    batch.add_argument("--threads", type=int, default=None, help="threads per worker")
    batch.add_argument("--no-progress", action="store_true")
    return export


def run_export(args: argparse.Namespace) -> int:
    """Run one export job; returns the exit code (see the module doc)."""
    try:
        return _JOBS[args.export_command](args)
    except LoraplexError as exc:
        print(f"loraplex export: error: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    except KeyboardInterrupt:
        print("loraplex export: interrupted", file=sys.stderr)
        return 130


def _recipe(args):
    from loraplex.server.errors import InvalidArgument
    from loraplex.server.types import MergeMethod

    from .merge import AdapterSpec, MergeRecipe

    weights = [1.0] * len(args.adapter)
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise InvalidArgument(f"--weights: expected comma-separated numbers, got {args.weights!r}") from None
        if len(weights) != len(args.adapter):
            raise InvalidArgument(f"--weights has {len(weights)} values for {len(args.adapter)} --adapter")
    density = args.density if args.density is not None else 1.0
    return MergeRecipe(tuple(AdapterSpec(p, w) for p, w in zip(args.adapter, weights)), MergeMethod(args.method),
                       density, args.seed, args.base_weights, args.allow_mixed_bases)


def _merge(args) -> int:
    from .base import resolve_base
    from .checkpoint import CheckpointRequest, export_checkpoint
    from .outputs import check_output

    recipe = _recipe(args)
    request = CheckpointRequest(recipe, Path(args.out), args.dtype, args.quantize, args.force,
                                int(args.max_shard_mb * 2**20))
    check_output(request.out, args.force)
    info = export_checkpoint(resolve_base(args.base), request)
    merge = info["merge"]
    print(f"merged {len(merge['adapters'])} adapter(s) ({merge['recipe']['method']}) into {info['base']['model_id']}"
          f": {merge['num_tensors_changed']} tensors changed, {info['dtype']}, {info['bytes'] / 1e6:.1f} MB, "
          f"{info['seconds']:.1f} s -> {args.out}")
    if info["quantization"]:
        q = info["quantization"]
        print(f"re-quantized to NF4 on request: weight rel. error max {q['max_rel_error']:.4f} mean "
              f"{q['mean_rel_error']:.4f}; probe logits max |diff| {q['probe_logits_max_abs_diff']:.4f}, "
              f"greedy agreement {q['probe_greedy_agreement']:.1%}")
    return EXIT_OK


def _onnx(args) -> int:
    import shutil
    import tempfile
    from dataclasses import replace

    from loraplex.server.errors import InvalidArgument

    from .base import resolve_base
    from .checkpoint import CheckpointRequest, export_checkpoint
    from .onnx import OnnxRequest, export_onnx
    from .outputs import check_output
    from .validate import ValidationReport

    if (args.model is None) == (not args.adapter):
        raise InvalidArgument("give either --model (a merged checkpoint) or --adapter (merged on the fly)")
    out = Path(args.out)
    request = OnnxRequest(Path(args.model or "."), out, args.dtype, args.int4, args.block_size, args.external_data,
                          validate=not args.no_validate, validate_tokens=args.validate_tokens, exporter=args.exporter,
                          force=args.force)
    check_output(out, args.force)
    scratch = None
    try:
        source = None
        if args.adapter:
            base = resolve_base(args.base)
            recipe = _recipe(args)
            scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
            export_checkpoint(base, CheckpointRequest(recipe, scratch / "merged", "fp32"))
            request = replace(request, model_dir=scratch / "merged")
            source = {"base": str(base.path), "base_sha256": base.sha256, "merge": recipe.to_dict()}
        elif not Path(args.model).is_dir():
            raise InvalidArgument(f"--model {args.model}: not a folder")
        info = export_onnx(request, source)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"exported {info['format']} ({info['dtype']}, {info['exporter']}, opset {info['opset']}, "
          f"{'external data, ' if info['external_data'] else ''}{info['bytes'] / 1e6:.1f} MB) in "
          f"{info['export_seconds']:.1f} s -> {out}")
    if info["validation"]:
        report = ValidationReport(**{k: v for k, v in info["validation"].items()})
        print("validation: " + report.summary())
        if report.versus_full_precision:
            v = report.versus_full_precision
            print(f"int4 vs unquantized fp32: logits max |diff| {v['logits_max_abs_diff']:.3g}, greedy agreement "
                  f"{v['greedy_agreement']:.1%} (informative)")
    return EXIT_OK


def _tensorrt(args) -> int:
    from .tensorrt import TrtProfile, TrtRequest, build_engine

    profile = TrtProfile(args.min_batch, args.opt_batch, args.max_batch, args.opt_seq, args.max_seq,
                         args.opt_context, args.max_context)
    info = build_engine(TrtRequest(Path(args.onnx), profile, args.workspace_mib,
                                   Path(args.engine) if args.engine else None,
                                   Path(args.timing_cache) if args.timing_cache else None))
    print(f"built {info['engine']} ({info['bytes'] / 1e6:.1f} MB, TensorRT {info['tensorrt_version']}) "
          f"in {info['seconds']:.1f} s; timing cache {info['timing_cache']}")
    return EXIT_OK


def _run_onnx(args) -> int:
    from .generate import generate_text

    result = generate_text(Path(args.onnx), args.prompt, args.max_new_tokens, chat=not args.raw)
    print(result.text)
    print(f"[{result.num_tokens} tokens in {result.seconds:.2f} s]", file=sys.stderr)
    return EXIT_OK


def _batch(args) -> int:
    from loraplex.server.errors import InvalidArgument

    from .batch import BatchOptions, run_batch
    from .manifest import load_manifest

    index, count = 0, 1
    if args.shard:
        try:
            index, count = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise InvalidArgument(f"--shard must be K/N (e.g. 3/8), got {args.shard!r}") from None
    manifest = load_manifest(args.manifest, args.out, args.workers)
    summary = run_batch(manifest, BatchOptions(index, count, progress=not args.no_progress,
                                               threads_per_worker=args.threads))
    print(f"batch: {summary.done} done, {summary.skipped} skipped, {summary.failed} failed; "
          f"results in {summary.results_path}")
    if not summary.ok:
        failed = [name for name, e in json.loads(summary.results_path.read_text())["items"].items()
                  if e["status"] == "failed"]
        print(f"loraplex export: error: {summary.failed} item(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_BATCH_FAILURES
    return EXIT_OK


_JOBS = {"merge": _merge, "onnx": _onnx, "tensorrt": _tensorrt, "run-onnx": _run_onnx, "batch": _batch}

__all__ = ["add_export_parser", "run_export", "EXIT_INTERNAL"]
