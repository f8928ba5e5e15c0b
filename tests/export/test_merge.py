"""export merge: exact against PEFT (the embedded model, the Bar), mixes against PEFT's merge utils, NF4 on request."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from loraplex.export.base import resolve_base
from loraplex.export.checkpoint import CheckpointRequest, export_checkpoint
from loraplex.export.merge import AdapterSpec, MergeRecipe
from loraplex.server.types import MergeMethod

from .conftest import no_partials

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def peft_model(embedded_dir, embedded_adapter):
    """The oracle: PEFT's PeftModel with the adapter on the same base (unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(embedded_adapter)).eval()


@pytest.fixture(scope="module")
def prompt_ids(embedded_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(embedded_dir)).apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _greedy(model, ids, n=8):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


def test_embedded_fp32_merge_matches_peft(merged_fp32, peft_model, embedded_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_fp32), dtype=torch.float32).eval()
    theirs, ours = _logits(peft_model, prompt_ids), _logits(merged, prompt_ids)
    diff = float((ours - theirs).abs().max())
    print(f"fp32 merge vs PEFT: logits max |diff| {diff:.3g} (max |logit| {float(theirs.abs().max()):.3g})")
    assert diff < 1e-3
    tokens = _greedy(merged, prompt_ids)
    assert tokens == _greedy(peft_model, prompt_ids)
    base = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32).eval()
    assert tokens != _greedy(base, prompt_ids)  # the adapter matters: this comparison can fail
    config = json.loads((merged_fp32 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {"tokenizer.json", "generation_config.json", "model.safetensors", "export_info.json"} <= {
        p.name for p in merged_fp32.iterdir()}


def test_embedded_bf16_merge_within_bf16_tolerance(embedded_base, embedded_dir, embedded_adapter, peft_model,
                                                   prompt_ids, tmp_path):
    """bf16 tolerance = how far PEFT itself moves from its fp32 logits when the base runs in bf16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    export_checkpoint(embedded_base, CheckpointRequest(MergeRecipe((AdapterSpec(str(embedded_adapter)),)), out))
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    exact = _logits(peft_model, prompt_ids)
    peft_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.bfloat16),
                                          str(embedded_adapter)).eval()
    tolerance = float((_logits(peft_bf16, prompt_ids) - exact).abs().max())
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    diff = float((_logits(merged, prompt_ids) - exact).abs().max())
    print(f"bf16 merge vs PEFT fp32: logits max |diff| {diff:.3g}; PEFT on a bf16 base: {tolerance:.3g}")
    assert diff <= tolerance
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _peft_deltas(tiny, names):
    """{tensor name: [PEFT delta of each adapter]} from PeftModel.get_delta_weight (PEFT is the oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["base"])), str(tiny[names[0]]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(tiny[name]), adapter_name=name)
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            deltas[f"{path}.weight"] = [module.get_delta_weight(n).detach() if n in module.lora_A else None
                                        for n in names]
    return deltas


def _merge(tiny, tmp_path, names, weights, method=MergeMethod.LINEAR, density=1.0, seed=0, out="out"):
    recipe = MergeRecipe(tuple(AdapterSpec(str(tiny[n]), w) for n, w in zip(names, weights)), method, density, seed)
    export_checkpoint(resolve_base(str(tiny["base"])), CheckpointRequest(recipe, tmp_path / out, "fp32"))
    return load_file(str(tmp_path / out / "model.safetensors"))


def test_linear_mix_of_mixed_ranks_is_exact(tiny, tmp_path):
    names, weights = ["a", "b", "c"], [0.7, -0.4, 1.3]  # ranks 4, 8, 2 (rsLoRA); overlapping module sets
    merged = _merge(tiny, tmp_path, names, weights)
    base = load_file(str(tiny["base"] / "model.safetensors"))
    deltas = _peft_deltas(tiny, names)
    assert set(deltas) < set(base)
    for name, tensor in merged.items():
        expected = base[name].clone()
        for d, w in zip(deltas.get(name, []), weights):
            if d is not None:
                expected += w * d
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6, msg=name)
    assert sum(not torch.equal(merged[n], base[n]) for n in base) == len(deltas)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_peft_merge_utils(tiny, tmp_path, density):
    from peft.utils import merge_utils

    names, weights = ["a", "b"], [0.6, 0.9]
    merged = _merge(tiny, tmp_path, names, weights, MergeMethod.TIES, density)
    base = load_file(str(tiny["base"] / "model.safetensors"))
    for name, per_adapter in _peft_deltas(tiny, names).items():
        task = [d if d is not None else torch.zeros_like(base[name]) for d in per_adapter]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = merge_utils.ties(task, torch.tensor(weights), density, majority_sign_method="total")
        torch.testing.assert_close(merged[name], base[name] + expected, rtol=1e-5, atol=1e-6, msg=name)


def test_dare_is_seeded(tiny, tmp_path):
    names, weights = ["a", "b"], [1.0, 0.5]
    first = _merge(tiny, tmp_path, names, weights, MergeMethod.DARE_TIES, 0.5, seed=3, out="s3")
    again = _merge(tiny, tmp_path, names, weights, MergeMethod.DARE_TIES, 0.5, seed=3, out="s3-again")
    other = _merge(tiny, tmp_path, names, weights, MergeMethod.DARE_TIES, 0.5, seed=4, out="s4")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[key], other[key])
    linear = _merge(tiny, tmp_path, names, weights, out="linear")
    dense = _merge(tiny, tmp_path, names, weights, MergeMethod.DARE_LINEAR, 1.0, out="dare-1")
    torch.testing.assert_close(dense[key], linear[key], rtol=1e-6, atol=1e-6)  # density 1: nothing dropped


def test_nf4_requantization_is_explicit_and_measured(tiny, tmp_path, cli, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4"
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["b"], "--quantize", "nf4", "--dtype", "fp32",
               "--out", out) == 0
    printed = capsys.readouterr().out
    assert "re-quantized to NF4" in printed and "weight rel. error" in printed
    info = json.loads((out / "export_info.json").read_text())["quantization"]
    assert 0 < info["mean_rel_error"] <= info["max_rel_error"] < 0.2 and info["num_weights"] == 14  # 2 layers x 7; transformers keeps lm_head
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not (out / ".full-precision").exists() and no_partials(tmp_path)


def test_base_weights_nf4_merges_into_what_the_nf4_server_holds(tiny, tmp_path):
    from loraplex.server.model.layers import NF4Linear

    recipe = MergeRecipe((AdapterSpec(str(tiny["a"])),), base_weights="nf4")
    export_checkpoint(resolve_base(str(tiny["base"])), CheckpointRequest(recipe, tmp_path / "o", "fp32"))
    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    plain = _merge(tiny, tmp_path, ["a"], [1.0], out="plain")
    base = load_file(str(tiny["base"] / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"  # not adapted: the NF4 round trip only
    torch.testing.assert_close(merged[name], NF4Linear(base[name], None).dequantized_weight())
    q = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q] - NF4Linear(base[q], None).dequantized_weight(), plain[q] - base[q],
                               rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_loads_in_transformers(tiny, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["b"], "--dtype", "fp32", "--out", tmp_path / "one") == 0
    assert cli("merge", "--base", tiny["base"], "--adapter", tiny["b"], "--dtype", "fp32", "--max-shard-mb", "0.05",
               "--out", tmp_path / "many") == 0
    shards = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one")).eval()
    many = AutoModelForCausalLM.from_pretrained(str(tmp_path / "many")).eval()
    assert torch.equal(_logits(one, ids), _logits(many, ids))
