"""export onnx / run-onnx: onnxruntime against PyTorch and transformers (the Bar on the embedded model),
dtypes, int4, external data, and a validator that does fail when the graph is wrong."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from loraplex.export.onnx import OnnxRequest, export_onnx
from loraplex.export.runtime import OnnxDecoder, greedy_kv

from .conftest import no_partials


def test_embedded_onnx_matches_pytorch(merged_onnx):
    out, info = merged_onnx
    report = info["validation"]
    print(f"embedded merged fp32 ONNX: logits max |diff| {report['logits_max_abs_diff']:.3g} "
          f"(tolerance {report['tolerance']:.3g}); greedy {report['greedy_tokens']} tokens equal")
    assert report["runnable"] and report["passed"] and report["greedy_equal"]
    assert report["greedy_tokens"] == 12 and report["prompt_lengths"][0] != report["prompt_lengths"][1]
    assert report["logits_max_abs_diff"] <= report["tolerance"] < 0.01
    assert json.loads((out / "export_info.json").read_text())["validation"]["passed"]


def test_embedded_onnx_greedy_equals_transformers_generate(merged_onnx, merged_fp32):
    """An oracle outside our code: transformers' own model and generate() on the merged checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged_onnx
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompts = [tokenizer("The capital of France is").input_ids, tokenizer("Write a haiku about the sea").input_ids]
    session = OnnxDecoder(out / "model.onnx")
    tokens, first = greedy_kv(session.step, session.empty_past, prompts, 10)
    hf = AutoModelForCausalLM.from_pretrained(str(merged_fp32), dtype=torch.float32).eval()
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = hf(ids).logits[0].numpy()
            generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                    do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
        assert tokens[row] == generated
        real = first[row, first.shape[1] - len(prompt):]  # left-padded row: its real tokens are the last ones
        assert np.abs(real - logits).max() < 1e-3


def test_run_onnx_smoke(cli, merged_onnx, merged_fp32, capsys):
    """Prompt in, text out: the same text as transformers' greedy generate on the merged checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged_onnx
    assert cli("run-onnx", out, "--prompt", "What is the capital of France?", "--max-new-tokens", "12") == 0
    text = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_fp32))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    hf = AutoModelForCausalLM.from_pretrained(str(merged_fp32), dtype=torch.float32).eval()
    with torch.no_grad():
        generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert text and text == tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_dynamo_export_with_kv_cache(tiny, tmp_path, cli, capsys):
    """The default exporter, from adapters merged on the fly, dynamic axes declared in the graph."""
    out = tmp_path / "onnx"
    assert cli("onnx", "--base", tiny["base"], "--adapter", tiny["b"], "--out", out, "--validate-tokens", "6") == 0
    assert "PASS" in capsys.readouterr().out
    model = onnx.load(str(out / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    info = json.loads((out / "export_info.json").read_text())
    assert info["exporter"] == "dynamo" and info["source"]["merge"]["adapters"][0]["name"] == "b"
    assert no_partials(tmp_path) and not list(tmp_path.glob(".*merge-*"))


def _merged(tiny, tmp_path):
    from loraplex.export.base import resolve_base
    from loraplex.export.checkpoint import CheckpointRequest, export_checkpoint
    from loraplex.export.merge import AdapterSpec, MergeRecipe

    out = tmp_path / "merged"
    recipe = MergeRecipe((AdapterSpec(str(tiny["a"]), 0.5), AdapterSpec(str(tiny["c"]), 2.0)))
    export_checkpoint(resolve_base(str(tiny["base"])), CheckpointRequest(recipe, out, "fp32"))
    return out


def test_dtypes(tiny, tmp_path):
    merged = _merged(tiny, tmp_path)
    fp16 = export_onnx(OnnxRequest(merged, tmp_path / "fp16", "fp16", exporter="torchscript"))["validation"]
    assert fp16["runnable"] and fp16["passed"]
    bf16 = export_onnx(OnnxRequest(merged, tmp_path / "bf16", "bf16", exporter="torchscript"))["validation"]
    assert not bf16["runnable"] and "CPU provider has no kernel" in bf16["reason"]
    kv = [i for i in onnx.load(str(tmp_path / "bf16" / "model.onnx")).graph.input if i.name.startswith("past")][0]
    assert kv.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


def test_int4(tiny, tmp_path):
    merged = _merged(tiny, tmp_path)
    info = export_onnx(OnnxRequest(merged, tmp_path / "int4", int4=True, exporter="torchscript", validate_tokens=10))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int4" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops
    report = info["validation"]
    assert report["passed"] and report["logits_max_abs_diff"] < 1e-4
    assert report["versus_full_precision"]["logits_max_abs_diff"] > 100 * report["logits_max_abs_diff"]
    assert info["bytes"] < 0.6 * info["parameter_bytes"]


def test_external_data(tiny, tmp_path):
    merged = _merged(tiny, tmp_path)
    for exporter in ("torchscript", "dynamo"):
        out = tmp_path / f"ext-{exporter}"
        info = export_onnx(OnnxRequest(merged, out, external_data="auto", external_data_threshold=10_000,
                                       exporter=exporter, validate_tokens=4))
        assert info["external_data"] and info["validation"]["passed"]
        assert (out / "model.onnx.data").stat().st_size >= 0.9 * info["parameter_bytes"]
    small = export_onnx(OnnxRequest(merged, tmp_path / "inline", exporter="torchscript", validate_tokens=2))
    assert not small["external_data"] and not (tmp_path / "inline" / "model.onnx.data").exists()


def test_validator_catches_a_wrong_graph(tiny, tmp_path):
    """Export, then change one weight on the PyTorch side only: the comparison must fail."""
    from loraplex.export.decoder import ExportDecoder
    from loraplex.export.validate import compare
    from loraplex.server.config import ModelConfig
    from loraplex.server.model.loader import load_model

    merged = _merged(tiny, tmp_path)
    export_onnx(OnnxRequest(merged, tmp_path / "o", exporter="torchscript", validate=False))
    decoder = ExportDecoder(load_model(ModelConfig(path=str(merged), quantization="none")).model).eval()
    prompts = [[3, 4, 5, 6], [7, 8]]
    assert compare("fp32", "pytorch", tmp_path / "o" / "model.onnx", decoder, prompts, 4).passed
    with torch.no_grad():
        decoder.layers[1].mlp.down_proj.weight_t.mul_(1.05)
    assert not compare("fp32", "pytorch", tmp_path / "o" / "model.onnx", decoder, prompts, 4).passed


def test_onnx_bad_inputs(cli, capsys, tiny, tmp_path):
    assert cli("onnx", "--model", tmp_path / "none", "--out", tmp_path / "o") == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli("onnx", "--model", tiny["base"], "--dtype", "fp16", "--int4", "--out", tmp_path / "o") == 2
    assert "--int4 quantizes an fp32 graph" in capsys.readouterr().err
    assert cli("onnx", "--out", tmp_path / "o") == 2
    assert cli("run-onnx", tmp_path, "--prompt", "hi") == 2
    assert "no model.onnx" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
