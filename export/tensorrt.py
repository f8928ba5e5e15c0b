"""`export tensorrt`: a serialized TensorRT engine from an exported decoder, or, where `tensorrt` does not import,
the equivalent `trtexec` command written next to the ONNX and exit code 3.

The build follows TensorRT's Python API (10.x): a strongly typed network (precisions come from the
ONNX, no fp16/bf16 builder flags), one optimisation profile covering prefill and decode:

    input_ids, position_ids   [batch, seq]                  seq  in 1 .. max_seq
    attention_mask            [batch, past + seq]           past + seq in 1 .. max_context
    past_key_values.*         [batch, kv_heads, past, dim]  past in 0 .. max_context - 1

a workspace limit, and a timing cache that is read before and written after the build (so rebuilds
and other models with the same layers build faster). trtexec.sh runs the same build with trtexec.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ExportError, TensorRTUnavailable
from .outputs import write_json

ENGINE_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
COMMAND_FILE = "trtexec.sh"
Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TrtProfile:
    """Ranges of the dynamic axes (min, opt, max): batch, tokens per step and total context."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    opt_seq: int = 1
    """Tokens per step to tune for: 1 = decode."""
    max_seq: int = 512
    """Longest prefill chunk."""
    opt_context: int = 512
    max_context: int = 2048
    """past + seq."""

    def __post_init__(self):
        problems = []
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            problems.append(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
                            f"{self.opt_batch}, {self.max_batch}")
        if not 1 <= self.opt_seq <= self.max_seq:
            problems.append(f"need 1 <= opt_seq <= max_seq, got {self.opt_seq}, {self.max_seq}")
        if not self.opt_seq <= self.opt_context <= self.max_context:
            problems.append(f"need opt_seq <= opt_context <= max_context, got {self.opt_seq}, {self.opt_context}, "
                            f"{self.max_context}")
        if self.max_seq > self.max_context:
            problems.append(f"max_seq {self.max_seq} exceeds max_context {self.max_context}")
        if problems:
            raise ExportError("tensorrt profile: " + "; ".join(problems))

    def shapes(self, graph: "GraphInputs") -> dict[str, tuple[Shape, Shape, Shape]]:
        """{input name: (min, opt, max)} for every input of the decoder."""
        b0, b1, b2 = self.min_batch, self.opt_batch, self.max_batch
        tokens = ((b0, 1), (b1, self.opt_seq), (b2, self.max_seq))
        shapes = {"input_ids": tokens, "position_ids": tokens,
                  "attention_mask": ((b0, 1), (b1, self.opt_context), (b2, self.max_context))}
        kv, dim = graph.kv_heads, graph.head_dim
        past = ((b0, kv, 0, dim), (b1, kv, self.opt_context - self.opt_seq, dim), (b2, kv, self.max_context - 1, dim))
        shapes.update({name: past for name in graph.past_names})
        return shapes


@dataclass(frozen=True, slots=True)
class GraphInputs:
    """What the profile needs to know about an exported decoder, read from the ONNX file."""

    onnx_path: Path
    past_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    custom_ops: tuple[str, ...]
    """Ops outside the standard ONNX domain (e.g. com.microsoft MatMulNBits), which TensorRT cannot parse."""


def read_graph(path: Path) -> GraphInputs:
    import onnx

    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file (pass an `export onnx` output folder or its model.onnx)")
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    past = tuple(n for n in inputs if n.startswith("past_key_values."))
    if not past or not {"input_ids", "attention_mask", "position_ids"} <= set(inputs):
        raise ExportError(f"{path}: not a loraplex decoder export (inputs: {', '.join(inputs)})")
    dims = inputs[past[0]].type.tensor_type.shape.dim
    custom = tuple(sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}))
    return GraphInputs(path, past, dims[1].dim_value, dims[3].dim_value, custom)


@dataclass(frozen=True, slots=True)
class TrtRequest:
    onnx: Path
    """An `export onnx` output folder (or its model.onnx)."""
    profile: TrtProfile = TrtProfile()
    workspace_mib: int = 4096
    engine: Path | None = None
    """Default: model.plan next to the ONNX."""
    timing_cache: Path | None = None
    """Default: timing.cache next to the ONNX."""

    def __post_init__(self):
        if self.workspace_mib < 1:
            raise ExportError(f"tensorrt workspace must be >= 1 MiB, got {self.workspace_mib}")


def _shape_arg(shapes: dict[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def trtexec_command(graph: GraphInputs, request: TrtRequest) -> list[str]:
    """The trtexec equivalent of build_engine (TensorRT 10 flags), paths as given."""
    shapes = request.profile.shapes(graph)
    engine, cache = _paths(graph, request)
    return ["trtexec", f"--onnx={graph.onnx_path}", f"--saveEngine={engine}", "--stronglyTyped",
            f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
            f"--maxShapes={_shape_arg(shapes, 2)}", f"--memPoolSize=workspace:{request.workspace_mib}",
            f"--timingCacheFile={cache}"]


def write_command(graph: GraphInputs, request: TrtRequest) -> Path:
    """trtexec.sh next to the ONNX: the same build, runnable on a machine with TensorRT."""
    folder = graph.onnx_path.parent
    graph_here = GraphInputs(Path(graph.onnx_path.name), graph.past_names, graph.kv_heads, graph.head_dim,
                             graph.custom_ops)
    here = TrtRequest(request.onnx, request.profile, request.workspace_mib,
                      _relative(request.engine, folder), _relative(request.timing_cache, folder))
    command = " \\\n    ".join(shlex.quote(part) for part in trtexec_command(graph_here, here))
    script = folder / COMMAND_FILE
    tmp = folder / f".{COMMAND_FILE}.tmp-{os.getpid()}"
    tmp.write_text("#!/bin/sh\n# Builds the TensorRT engine loraplex would build (export tensorrt).\n"
                   f'set -e\ncd "$(dirname "$0")"\n{command}\n')
    tmp.chmod(0o755)
    os.replace(tmp, script)
    return script


def build_engine(request: TrtRequest) -> dict:
    """Build and write the engine; without `tensorrt`, write trtexec.sh and raise TensorRTUnavailable."""
    graph = read_graph(request.onnx)
    if graph.custom_ops:
        raise ExportError(f"{graph.onnx_path}: TensorRT cannot parse {', '.join(graph.custom_ops)} (an --int4 "
                          "export?); build the engine from a fp32/fp16/bf16 export")
    script = write_command(graph, request)
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            f"tensorrt is not installed (pip install tensorrt, on a machine with an NVIDIA GPU); the equivalent "
            f"trtexec command is in {script}") from None
    return _build(trt, graph, request, script)


def _build(trt, graph: GraphInputs, request: TrtRequest, script: Path) -> dict:
    """TensorRT 10 Python API: strongly typed network, one profile, workspace limit, timing cache."""
    started = time.perf_counter()
    engine_path, cache_path = _paths(graph, request)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph.onnx_path)):  # resolves model.onnx.data next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{graph.onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in request.profile.shapes(graph).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {graph.onnx_path} (see its log above)")
    _atomic_bytes(engine_path, bytes(serialized))
    _atomic_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    info = {"format": "tensorrt", "engine": str(engine_path), "timing_cache": str(cache_path),
            "trtexec": str(script), "tensorrt_version": trt.__version__, "profile": asdict(request.profile),
            "workspace_mib": request.workspace_mib, "bytes": engine_path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3)}
    write_json(engine_path.with_name(engine_path.name + ".json"), info)
    return info


def _paths(graph: GraphInputs, request: TrtRequest) -> tuple[Path, Path]:
    folder = graph.onnx_path.parent
    return (Path(request.engine) if request.engine else folder / ENGINE_FILE,
            Path(request.timing_cache) if request.timing_cache else folder / TIMING_CACHE_FILE)


def _relative(path: Path | None, folder: Path) -> Path | None:
    if path is None:
        return None
    return Path(os.path.relpath(Path(path).resolve(), folder.resolve()))


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
