"""`export onnx`: a merged HF checkpoint -> a KV-cache decoder in ONNX (dynamic batch and sequence axes),
optionally 4-bit (MatMulNBits), validated with onnxruntime before it is published.

The graph comes from torch.onnx over decoder.py's ExportDecoder, traced once with batch 2, sequence 3,
past 5, every one of those axes dynamic. Two exporters, same graph contract, both validated the same
way: `dynamo` (torch.export + onnxscript, torch's default since 2.9; ~70 s for SmolLM2-135M on one
CPU core) and `torchscript` (the legacy tracer torch 2.13 still ships, deprecated; ~10 s). Models
whose weights pass ~2 GB are written with external data (model.onnx + model.onnx.data): protobuf
cannot hold more in one file.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.server.config import ModelConfig
from loraplex.server.errors import InvalidArgument
from loraplex.server.model.loader import load_model

from .decoder import ExportDecoder
from .errors import ValidationFailed
from .hf import TOKENIZER_FILES
from .outputs import INFO_FILE, set_aside, staged_output, tree_bytes, write_json
from .validate import compare, int4_weights, load_int4_weights, torch_greedy_recompute, validation_prompts

log = logging.getLogger(__name__)

ONNX_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXTERNAL_DATA_CHOICES = ("auto", "always", "never")
EXPORTERS = ("dynamo", "torchscript")
OPSET = 18
"""For the torchscript exporter (dynamo picks its own, 20 with torch 2.13)."""
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - (64 << 20)
"""Protobuf's 2 GiB limit, less room for the graph itself."""
MODEL_FILE = "model.onnx"
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "onnxruntime.quantization.matmul_nbits_quantizer", "torch.onnx")
"""Loggers that report every rewrite at INFO; an export logs one line of its own instead."""
COPIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


@dataclass(frozen=True, slots=True)
class OnnxRequest:
    model_dir: Path
    """A full-precision HF checkpoint (e.g. `export merge`'s output)."""
    out: Path
    dtype: str = "fp32"
    int4: bool = False
    """Quantize every MatMul weight to 4 bits with onnxruntime's MatMulNBits quantizer (RTN, symmetric)."""
    block_size: int = 32
    external_data: str = "auto"
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    validate: bool = True
    validate_tokens: int = 8
    exporter: str = "dynamo"
    force: bool = False

    def __post_init__(self):
        problems = []
        if self.exporter not in EXPORTERS:
            problems.append(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if self.dtype not in ONNX_DTYPES:
            problems.append(f"dtype must be one of {', '.join(ONNX_DTYPES)}, got {self.dtype!r}")
        if self.int4 and self.dtype != "fp32":
            problems.append(f"--int4 quantizes an fp32 graph (activations stay fp32), not {self.dtype}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            problems.append(f"block size must be a power of two >= 16, got {self.block_size}")
        if self.external_data not in EXTERNAL_DATA_CHOICES:
            problems.append(f"external data must be one of {', '.join(EXTERNAL_DATA_CHOICES)}")
        if self.validate_tokens < 1:
            problems.append(f"validation needs at least 1 greedy token, got {self.validate_tokens}")
        if problems:
            raise InvalidArgument("onnx export: " + "; ".join(problems))

    @property
    def kind(self) -> str:
        return "int4" if self.int4 else self.dtype

    def use_external_data(self, num_bytes: int) -> bool:
        return self.external_data == "always" or (self.external_data == "auto"
                                                  and num_bytes >= self.external_data_threshold)


def export_onnx(request: OnnxRequest, source: dict | None = None) -> dict:
    """Export, validate and publish request.out; returns what export_info.json records."""
    started = time.perf_counter()
    out = Path(request.out)
    with staged_output(out, request.force) as stage:
        loaded = load_model(ModelConfig(path=str(request.model_dir), quantization="none",
                                        dtype=ONNX_DTYPES[request.dtype]))
        decoder = ExportDecoder(loaded.model).eval()
        del loaded.model.model.layers  # the decoder holds what it needs
        param_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
        prompts = validation_prompts(loaded.tokenizer, loaded.arch.vocab_size)
        target = stage / MODEL_FILE
        exported_at = stage / ".full-precision" / MODEL_FILE if request.int4 else target
        exported_at.parent.mkdir(exist_ok=True)
        export_seconds = _torch_export(decoder, exported_at, request.use_external_data(param_bytes), request.exporter)
        full_precision = None
        if request.int4:
            if request.validate:
                full_precision = torch_greedy_recompute(decoder, prompts, request.validate_tokens)
            quantized_bytes = _quantize_int4(exported_at, target, request)
            shutil.rmtree(exported_at.parent)
            if request.validate:
                import onnx

                replaced = load_int4_weights(decoder, int4_weights(onnx.load(str(target))))
                if replaced == 0:
                    raise RuntimeError(f"{target}: no MatMulNBits weight maps back to the decoder")
        for name in COPIED_FILES:
            if (Path(request.model_dir) / name).is_file():
                shutil.copy2(Path(request.model_dir) / name, stage / name)
        validation = None
        if request.validate:
            reference = ("pytorch, same decoder with the int4 weights read back" if request.int4
                         else f"pytorch {request.dtype}, same weights")
            report = compare(request.kind, reference, target, decoder, prompts, request.validate_tokens)
            if request.int4 and report.runnable:
                report.versus_full_precision = _distance(report, full_precision, report.ort_logits, prompts)
            validation = report.to_dict()
            log.info("onnx validation: %s", report.summary())
        info = {"format": "onnx-int4" if request.int4 else "onnx", "dtype": request.dtype, "int4": request.int4,
                "block_size": request.block_size if request.int4 else None, "source": source or
                {"model_dir": str(request.model_dir)}, "exporter": request.exporter, "opset": _opset(target),
                "external_data": (stage / (MODEL_FILE + ".data")).exists(), "parameter_bytes": param_bytes,
                "bytes": tree_bytes(stage), "export_seconds": round(export_seconds, 3), "validation": validation,
                "seconds": round(time.perf_counter() - started, 3)}
        if request.int4:
            info["quantized_weight_bytes"] = quantized_bytes
        write_json(stage / INFO_FILE, info)
        if validation is not None and validation["runnable"] and not validation["passed"]:
            kept = set_aside(stage, out, ".invalid")
            raise ValidationFailed(f"onnx validation failed: {report.summary()}; the export is kept in {kept}")
    return info


def _quiet() -> None:
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _torch_export(decoder: ExportDecoder, path: Path, external_data: bool, exporter: str) -> float:
    started = time.perf_counter()
    _quiet()
    batch, seq, past = 2, 3, 5
    arch = decoder.arch
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    past_kv = [torch.zeros(batch, arch.num_kv_heads, past, arch.head_dim, dtype=decoder.dtype)
               for _ in range(2 * arch.num_layers)]
    args, io = (ids, mask, positions, *past_kv), decoder.io
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
            shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past_kv))
            program = torch.onnx.export(decoder, args, dynamo=True, dynamic_shapes=shapes, input_names=io.input_names,
                                        output_names=io.output_names, optimize=True, verbose=False)
            program.save(str(path), external_data=external_data)
        else:
            _torchscript_export(decoder, args, path, external_data)
    return time.perf_counter() - started


def _torchscript_export(decoder: ExportDecoder, args: tuple, path: Path, external_data: bool) -> None:
    """The legacy exporter writes into a scratch folder (past 2 GB it scatters one file per tensor there);
    onnx then writes the model, with one external data file when asked."""
    import onnx

    io = decoder.io
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{n: {0: "batch", 2: "past_sequence"} for n in io.past_names},
            **{n: {0: "batch", 2: "total_sequence"} for n in io.present_names}}
    scratch = path.parent / ".torchscript"
    scratch.mkdir()
    torch.onnx.export(decoder, args, str(scratch / MODEL_FILE), dynamo=False, input_names=io.input_names,
                      output_names=io.output_names, dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
    model = onnx.load(str(scratch / MODEL_FILE))
    onnx.save_model(model, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    shutil.rmtree(scratch)


def _quantize_int4(source: Path, target: Path, request: OnnxRequest) -> int:
    """onnxruntime's MatMulNBits quantizer (RTN, symmetric, `block_size`) over every MatMul with a constant weight."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    _quiet()
    model = onnx.load(str(source))
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=request.block_size, is_symmetric=True)
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    weight_bytes = sum(len(i.raw_data) for i in quantizer.model.model.graph.initializer)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=request.use_external_data(weight_bytes))
    return weight_bytes


def _distance(report, full_precision, ort_logits, prompts) -> dict:
    """How far the int4 export is from the unquantized model (informative: 4 bits change tokens)."""
    import numpy as np

    from .runtime import left_pad

    tokens, logits = full_precision
    real = left_pad(prompts)[1].astype(bool)
    pairs = [(a, b) for ort_row, fp_row in zip(report.ort_tokens, tokens) for a, b in zip(ort_row, fp_row)]
    return {"reference": "pytorch fp32, unquantized weights", "torch_tokens": tokens,
            "logits_max_abs_diff": float(np.abs(ort_logits[real] - logits[real]).max()),
            "greedy_agreement": sum(a == b for a, b in pairs) / max(1, len(pairs))}


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
