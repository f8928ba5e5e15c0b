"""load_adapter against real PEFT files: what loads equals PEFT's weights and scales; what is bad is
refused with the right error class and a message that names the problem."""
from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from loraplex.server.adapters.loader import load_adapter
from loraplex.server.adapters.peft_format import get_pattern_key, parse_key, read_lora_config
from loraplex.server.errors import AdapterMismatch, InvalidAdapter
from loraplex.server.model.arch import LINEAR_MODULES

from .conftest import edit_config, edit_tensors, key, save_peft, tiny_llama

_PEFT_MODULE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


def peft_lora_layers(peft_model) -> dict:
    """(layer, module) -> PEFT's LoRA Linear, found independently of parse_key."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for module_name, module in peft_model.named_modules():
        m = _PEFT_MODULE.fullmatch(module_name)
        if m and isinstance(module, LoraLayer):
            found[(int(m[1]), m[2])] = module
    return found


def assert_matches_peft(adapter, peft_model):
    layers = peft_lora_layers(peft_model)
    assert layers and set(adapter.modules) == set(layers)
    for target, layer in layers.items():
        ours = adapter.modules[target]
        assert torch.equal(ours.a, layer.lora_A["default"].weight.detach())
        assert torch.equal(ours.b, layer.lora_B["default"].weight.detach())
        assert ours.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
    return layers


def raises(cls, *fragments):
    """pytest.raises(cls) whose message must contain every fragment (plain text, not regex)."""
    return pytest.raises(cls, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --- loads ---------------------------------------------------------------------------------------

def test_plain_adapter_equals_peft_weights_and_scale(make_adapter, tiny_arch):
    folder, peft_model = make_adapter(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="plain")
    assert_matches_peft(adapter, peft_model)
    assert set(adapter.modules) == {(i, m) for i in range(2) for m in ("q_proj", "v_proj")}
    assert {m.scale for m in adapter.modules.values()} == {2.0}
    assert adapter.rank == 4 and adapter.name == "plain" and adapter.source == str(folder)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert adapter.sha256 == hashlib.sha256(weights).hexdigest()
    assert adapter.config == json.loads((folder / "adapter_config.json").read_text())
    assert all(m.a.device.type == "cpu" and m.a.dtype == torch.float32 for m in adapter.modules.values())


def test_delta_equals_peft_forward(make_adapter, tiny_arch):
    """scale * x A^T B^T is exactly what PEFT's LoRA layer adds to the base projection."""
    folder, peft_model = make_adapter(r=4, lora_alpha=16, target_modules="all-linear")
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="delta")
    torch.manual_seed(2)
    for (layer_idx, module), layer in peft_lora_layers(peft_model).items():
        x = torch.randn(3, layer.in_features)
        expected = layer(x) - layer.base_layer(x)
        lora = adapter.modules[(layer_idx, module)]
        torch.testing.assert_close(lora.scale * (x @ lora.a.T @ lora.b.T), expected)


def test_rslora_scale_is_alpha_over_sqrt_r(make_adapter, tiny_arch):
    folder, peft_model = make_adapter(r=9, lora_alpha=6, use_rslora=True)
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="rs")
    assert_matches_peft(adapter, peft_model)
    assert {m.scale for m in adapter.modules.values()} == {6 / math.sqrt(9)}


def test_rank_and_alpha_patterns_match_peft(make_adapter, tiny_arch):
    folder, peft_model = make_adapter(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"q_proj": 3, "down_proj": 5})
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="patterns")
    assert_matches_peft(adapter, peft_model)
    ranks = {target: m.rank for target, m in adapter.modules.items()}
    assert ranks == {(0, "q_proj"): 4, (1, "q_proj"): 6, (0, "v_proj"): 2, (1, "v_proj"): 2,
                     (0, "down_proj"): 4, (1, "down_proj"): 4}
    assert adapter.modules[(1, "q_proj")].scale == 3 / 6
    assert adapter.modules[(0, "v_proj")].scale == 8 / 2
    assert adapter.modules[(0, "down_proj")].scale == 5 / 4


def test_rslora_with_patterns_matches_peft(make_adapter, tiny_arch):
    folder, peft_model = make_adapter(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 16},
                                      alpha_pattern={"layers.0.self_attn.q_proj": 2})
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="rs-patterns")
    assert_matches_peft(adapter, peft_model)
    assert adapter.modules[(1, "v_proj")].scale == 8 / 4
    assert adapter.modules[(0, "q_proj")].scale == 2 / 2


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "k_proj", "v_proj", "o_proj"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (["gate_proj", "up_proj", "down_proj"], {"gate_proj", "up_proj", "down_proj"}),
    (["o_proj", "down_proj"], {"o_proj", "down_proj"}),
    ("all-linear", set(LINEAR_MODULES)),
])
def test_target_sets(make_adapter, tiny_arch, targets, expected):
    folder, peft_model = make_adapter(target_modules=targets)
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="targets")
    assert_matches_peft(adapter, peft_model)
    assert adapter.target_modules == expected
    assert {layer for layer, _ in adapter.modules} == {0, 1}


def test_regex_targets_and_layers_to_transform(make_adapter, tiny_arch):
    folder, peft_model = make_adapter(target_modules=r".*\.layers\.1\.self_attn\.(k|v)_proj")
    adapter = load_adapter(folder, tiny_arch, max_rank=16, name="regex")
    assert_matches_peft(adapter, peft_model)
    assert set(adapter.modules) == {(1, "k_proj"), (1, "v_proj")}
    folder, peft_model = make_adapter(target_modules=["up_proj"], layers_to_transform=[0])
    assert set(load_adapter(folder, tiny_arch, max_rank=16, name="l0").modules) == {(0, "up_proj")}


def test_keeps_file_dtype_and_owns_memory(tmp_path, tiny_arch):
    peft_model = save_peft(tiny_llama(), tmp_path / "bf16", dtype=torch.bfloat16)
    adapter = load_adapter(tmp_path / "bf16", tiny_arch, max_rank=16, name="bf16")
    assert_matches_peft(adapter, peft_model)
    assert {m.a.dtype for m in adapter.modules.values()} == {torch.bfloat16}
    before = {t: m.b.clone() for t, m in adapter.modules.items()}
    (tmp_path / "bf16" / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # not mmap-aliased
    assert all(torch.equal(adapter.modules[t].b, b) for t, b in before.items())


def test_adapter_for_the_embedded_smollm2_loads(tmp_path, embedded_dir, smol_fp32):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    peft_model = save_peft(base, tmp_path / "smol", r=8, lora_alpha=16,
                           target_modules=["q_proj", "k_proj", "down_proj"])
    adapter = load_adapter(tmp_path / "smol", smol_fp32.arch, max_rank=64, name="smol")
    assert_matches_peft(adapter, peft_model)
    assert len(adapter.modules) == 3 * smol_fp32.arch.num_layers
    assert adapter.modules[(0, "k_proj")].b.shape == (smol_fp32.arch.num_kv_heads * smol_fp32.arch.head_dim, 8)


# --- format: folder, config, weights file -------------------------------------------------------

def test_missing_folder(tmp_path, tiny_arch):
    with raises(InvalidAdapter, "'gone'", "does not exist"):
        load_adapter(tmp_path / "nope", tiny_arch, 16, "gone")
    (tmp_path / "file").write_text("x")
    with raises(InvalidAdapter, "'file'", "is not a folder"):
        load_adapter(tmp_path / "file", tiny_arch, 16, "file")


def test_missing_config(adapter_dir, tiny_arch):
    (adapter_dir / "adapter_config.json").unlink()
    with raises(InvalidAdapter, "'a'", "adapter_config.json not found"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_unreadable_config(adapter_dir, tiny_arch, text, fragment):
    (adapter_dir / "adapter_config.json").write_text(text)
    with raises(InvalidAdapter, "'a'", fragment):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("updates, fragments", [
    ({"peft_type": "IA3"}, ["peft_type is 'IA3'", "only 'LORA'"]),
    ({"r": 0}, ["r must be a positive integer, got 0"]),
    ({"lora_alpha": "big"}, ["lora_alpha must be a number"]),
    ({"rank_pattern": {"q_proj": -1}}, ["rank_pattern['q_proj'] must be a positive integer"]),
    ({"alpha_pattern": {"(q_proj": 2}}, ["alpha_pattern key '(q_proj' is not a valid regex"]),
])
def test_bad_config_values(adapter_dir, tiny_arch, updates, fragments):
    edit_config(adapter_dir, **updates)
    with raises(InvalidAdapter, "'a'", *fragments):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_pickle_weights_refused(tmp_path, tiny_arch):
    save_peft(tiny_llama(), tmp_path / "pickled", safe=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").exists()
    with raises(InvalidAdapter, "'p'", "adapter_model.bin", "pickle weights are refused", "convert to safetensors"):
        load_adapter(tmp_path / "pickled", tiny_arch, 16, "p")


def test_missing_weights(adapter_dir, tiny_arch):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with raises(InvalidAdapter, "'a'", "adapter_model.safetensors not found"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("damage", [lambda b: b[:-10], lambda b: b[:5], lambda b: b"\xff" * 64, lambda b: b""])
def test_corrupt_safetensors(adapter_dir, tiny_arch, damage):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with raises(InvalidAdapter, "'a'", "not a valid safetensors file"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


# --- unsupported PEFT features -------------------------------------------------------------------

@pytest.mark.parametrize("updates, fragment", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["mlp.down_proj.weight"]}, "target_parameters"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
])
def test_unsupported_feature_refused_by_name(adapter_dir, tiny_arch, updates, fragment):
    load_adapter(adapter_dir, tiny_arch, 16, "a")  # loads before the edit
    edit_config(adapter_dir, **updates)
    with raises(InvalidAdapter, "'a'", "unsupported PEFT features", fragment):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("lora_kwargs, fragment", [
    ({"use_dora": True}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
])
def test_real_peft_feature_files_refused(make_adapter, tiny_arch, lora_kwargs, fragment):
    folder, _ = make_adapter(**lora_kwargs)
    with raises(InvalidAdapter, "unsupported PEFT features", fragment):
        load_adapter(folder, tiny_arch, 16, "a")


def test_embedding_and_lm_head_adapters_refused(make_adapter, tiny_arch):
    folder, _ = make_adapter(target_modules=["q_proj", "embed_tokens", "lm_head"])
    with raises(InvalidAdapter, "'e'", "embeddings/lm_head are not supported"):
        load_adapter(folder, tiny_arch, 16, "e")
    edit_config(folder, target_modules=["q_proj"])  # the keys alone are enough to refuse it
    with raises(InvalidAdapter, "'e'", "embeddings/lm_head are not supported", "lora_embedding_A"):
        load_adapter(folder, tiny_arch, 16, "e")


# --- unknown or incomplete tensors ---------------------------------------------------------------

def test_dora_magnitude_key_refused_by_name(make_adapter, tiny_arch):
    folder, _ = make_adapter(use_dora=True, target_modules=["q_proj"])
    edit_config(folder, use_dora=False)
    with raises(InvalidAdapter, "'d'", "model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"):
        load_adapter(folder, tiny_arch, 16, "d")


def test_stray_tensor_refused_by_name(adapter_dir, tiny_arch):
    edit_tensors(adapter_dir, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    with raises(InvalidAdapter, "'a'", "unexpected tensors", "'base_model.model.model.norm.weight'"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("drop, present, absent", [("B", "lora_A", "lora_B"), ("A", "lora_B", "lora_A")])
def test_half_pair_refused(adapter_dir, tiny_arch, drop, present, absent):
    edit_tensors(adapter_dir, lambda t: t.pop(key(1, "v_proj", drop)))
    with raises(InvalidAdapter, "'a'", f"model.layers.1.self_attn.v_proj has {present}.weight but no {absent}.weight"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_empty_file_refused(adapter_dir, tiny_arch):
    edit_tensors(adapter_dir, lambda t: t.clear())
    with raises(InvalidAdapter, "'a'", "holds no tensors"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


# --- does it fit this base -----------------------------------------------------------------------

def test_adapter_for_a_different_base_names_shapes(make_adapter, tiny_arch):
    folder, _ = make_adapter(model_overrides={"hidden_size": 96})
    with raises(AdapterMismatch, "'other'", "model.layers.0.self_attn.q_proj.lora_A.weight",
                "has shape [4, 96], expected [4, 64]", "different base model") as info:
        load_adapter(folder, tiny_arch, 16, "other")
    assert info.value.code == "FAILED_PRECONDITION"


def test_output_dim_mismatch_names_lora_b(make_adapter, tiny_arch):
    folder, _ = make_adapter(model_overrides={"num_key_value_heads": 4}, target_modules=["k_proj"])
    with raises(AdapterMismatch, "model.layers.0.self_attn.k_proj.lora_B.weight", "[64, 4]", "expected [32, 4]"):
        load_adapter(folder, tiny_arch, 16, "kv")


def test_too_many_layers(make_adapter, tiny_arch):
    folder, _ = make_adapter(model_overrides={"num_hidden_layers": 3})
    with raises(AdapterMismatch, "'deep'", "layer 2", "base model has 2 layers"):
        load_adapter(folder, tiny_arch, 16, "deep")


def test_unknown_target_module(adapter_dir, tiny_arch):
    def rename(tensors):
        for part in "AB":
            tensors[key(0, "q_proj", part).replace("q_proj", "qkv_proj")] = tensors.pop(key(0, "q_proj", part))

    edit_tensors(adapter_dir, rename)
    with raises(AdapterMismatch, "'a'", "model.layers.0.self_attn.qkv_proj", "does not adapt"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_ranks_of_a_and_b_disagree(adapter_dir, tiny_arch):
    edit_tensors(adapter_dir, lambda t: t.update({key(0, "v_proj", "B"): t[key(0, "v_proj", "B")][:, :3]}))
    with raises(AdapterMismatch, "model.layers.0.self_attn.v_proj", "rank of lora_A (4) and lora_B (3) disagree"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


@pytest.mark.parametrize("updates, fragment", [({"r": 8}, "r=8"),
                                               ({"rank_pattern": {"layers.1.self_attn.v_proj": 2}}, "r=2")])
def test_rank_differs_from_config(adapter_dir, tiny_arch, updates, fragment):
    edit_config(adapter_dir, **updates)
    with raises(AdapterMismatch, "'a'", "has rank 4", fragment):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_rank_above_max_rank(adapter_dir, tiny_arch):
    with raises(AdapterMismatch, "'a'", "rank 4", "max_rank 2"):
        load_adapter(adapter_dir, tiny_arch, 2, "a")
    assert load_adapter(adapter_dir, tiny_arch, 4, "a").rank == 4


# --- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_refused(adapter_dir, tiny_arch, bad):
    def poison(tensors):
        tensors[key(1, "q_proj", "B")][3, 1] = bad

    edit_tensors(adapter_dir, poison)
    with raises(InvalidAdapter, "'a'", "model.layers.1.self_attn.q_proj.lora_B.weight", "non-finite"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_empty_tensors_refused(adapter_dir, tiny_arch):
    edit_tensors(adapter_dir, lambda t: t.update({key(0, "q_proj", "A"): torch.zeros(0, 64),
                                                  key(0, "q_proj", "B"): torch.zeros(64, 0)}))
    with raises(InvalidAdapter, "'a'", "model.layers.0.self_attn.q_proj.lora_A.weight", "is empty"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


def test_integer_tensors_refused(adapter_dir, tiny_arch):
    edit_tensors(adapter_dir, lambda t: t.update({key(0, "q_proj", "A"): t[key(0, "q_proj", "A")].to(torch.int32)}))
    with raises(InvalidAdapter, "model.layers.0.self_attn.q_proj.lora_A.weight", "dtype torch.int32"):
        load_adapter(adapter_dir, tiny_arch, 16, "a")


# --- peft_format pieces against PEFT itself ------------------------------------------------------

@pytest.mark.parametrize("target", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                    "model.layers.11.mlp.down_proj", "model.layers.1.self_attn.v_proj"])
def test_get_pattern_key_equals_peft(target):
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = {"layers.1.self_attn.q_proj": 1, "q_proj": 2, r"layers\.1\d\..*": 3, "proj": 4, "v_proj": 5}
    assert get_pattern_key(patterns, target) == peft_get_pattern_key(list(patterns), target)
    assert get_pattern_key({}, target) == target


def test_parse_key():
    assert parse_key(key(3, "down_proj", "B")) == (3, "down_proj", "B")
    assert parse_key(key(0, "o_proj", "A")) == (0, "o_proj", "A")
    for bad in ["base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",  # wrong block
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
                "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
                "base_model.model.lm_head.lora_A.weight",
                "model.layers.0.self_attn.q_proj.lora_A.weight"]:
        assert parse_key(bad) is None, bad


def test_read_lora_config_fields(make_adapter):
    folder, _ = make_adapter(r=4, lora_alpha=12, use_rslora=True, rank_pattern={"v_proj": 2})
    config = read_lora_config(folder, "c")
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 12, True)
    assert config.rank_pattern == {"v_proj": 2} and set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert config.scale_for("model.layers.0.self_attn.v_proj") == 12 / math.sqrt(2)
