"""export tensorrt where TensorRT cannot be installed: the profile and trtexec command logic, exit code 3.

The engine build itself (tensorrt.py::_build) needs TensorRT and an NVIDIA GPU and is not run here."""
from __future__ import annotations

import importlib.util
import subprocess

import pytest

from loraplex.export.errors import ExportError
from loraplex.export.onnx import OnnxRequest, export_onnx
from loraplex.export.tensorrt import TrtProfile, TrtRequest, read_graph, trtexec_command

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="tensorrt is installed: these tests cover the machines without it")


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "onnx"
    export_onnx(OnnxRequest(tiny["base"], out, exporter="torchscript", validate=False))
    return out


def _shapes(argument: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in dims.split("x"))
            for name, dims in (part.rsplit(":", 1) for part in argument.split("=", 1)[1].split(","))}


def test_profile_covers_prefill_and_decode(tiny_onnx):
    graph = read_graph(tiny_onnx)
    assert (graph.kv_heads, graph.head_dim, len(graph.past_names)) == (2, 16, 4) and not graph.custom_ops
    shapes = TrtProfile(min_batch=1, opt_batch=4, max_batch=16, opt_seq=1, max_seq=256, opt_context=300,
                        max_context=1024).shapes(graph)
    assert shapes["input_ids"] == ((1, 1), (4, 1), (16, 256))
    assert shapes["attention_mask"] == ((1, 1), (4, 300), (16, 1024))
    assert shapes["past_key_values.1.value"] == ((1, 2, 0, 16), (4, 2, 299, 16), (16, 2, 1023, 16))
    assert set(shapes) == {"input_ids", "attention_mask", "position_ids", *graph.past_names}


@pytest.mark.parametrize("bad", [dict(min_batch=2, opt_batch=1), dict(max_seq=4096), dict(opt_seq=0),
                                 dict(opt_context=4096)])
def test_inconsistent_profiles_are_refused(bad):
    with pytest.raises(ExportError, match="tensorrt profile"):
        TrtProfile(**bad)


def test_trtexec_command_matches_the_profile(tiny_onnx):
    graph = read_graph(tiny_onnx)
    request = TrtRequest(tiny_onnx, TrtProfile(max_batch=4, max_context=128, max_seq=64, opt_context=64),
                         workspace_mib=2048)
    command = trtexec_command(graph, request)
    assert command[0] == "trtexec" and "--stronglyTyped" in command
    assert "--memPoolSize=workspace:2048" in command
    assert any(c.startswith("--timingCacheFile=") and c.endswith("timing.cache") for c in command)
    args = {c.split("=", 1)[0]: c for c in command[1:]}
    shapes = request.profile.shapes(graph)
    for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        assert _shapes(args[flag]) == {name: dims[which] for name, dims in shapes.items()}


def test_cli_without_tensorrt_exits_3_and_writes_the_command(cli, capsys, tiny_onnx):
    assert cli("tensorrt", tiny_onnx, "--max-batch", "2", "--max-context", "256", "--opt-context", "128",
               "--max-seq", "128") == 3
    err = capsys.readouterr().err
    assert "tensorrt is not installed" in err and "trtexec.sh" in err and len(err.strip().splitlines()) == 1
    script = tiny_onnx / "trtexec.sh"
    text = script.read_text()
    assert "--onnx=model.onnx" in text and "--saveEngine=model.plan" in text and "attention_mask:2x256" in text
    subprocess.run(["sh", "-n", str(script)], check=True)  # valid shell
    assert not (tiny_onnx / "model.plan").exists()


def test_int4_and_non_decoder_graphs_are_refused(cli, capsys, tiny, tmp_path):
    export_onnx(OnnxRequest(tiny["base"], tmp_path / "int4", int4=True, exporter="torchscript", validate=False))
    assert cli("tensorrt", tmp_path / "int4") == 2
    assert "com.microsoft.MatMulNBits" in capsys.readouterr().err
    assert cli("tensorrt", tmp_path / "missing") == 2
    assert "no such ONNX file" in capsys.readouterr().err
