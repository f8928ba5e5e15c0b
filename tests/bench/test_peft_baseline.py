"""The PEFT baseline on a tiny random Llama on CPU: NF4 layers as from_pretrained builds them, seeded weights,
exact token counts, adapters that change outputs, mixed batches equal to rows run alone, fast adapter cloning
equal to PEFT's add_adapter, and clear errors."""
from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch import nn

from loraplex.server.bench import peft_baseline as pb

TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
VOCAB = TINY["vocab_size"]
NUM_PROJECTIONS = TINY["num_hidden_layers"] * len(pb.LLAMA_TARGETS)


def fp32_model(num_adapters: int, **kwargs):
    """Dense fp32 base + adapters: exact enough on CPU for token-for-token comparisons."""
    model = pb.build_hf_nf4_model(TINY, "cpu", compute_dtype=torch.float32, quantization="none")
    return pb.add_random_adapters(model, num_adapters, **kwargs)


def test_nf4_layers_are_what_from_pretrained_builds():
    model = pb.build_hf_nf4_model(TINY, "cpu")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == NUM_PROJECTIONS
    assert {n.rsplit(".", 1)[1] for n in quantized} == set(pb.LLAMA_TARGETS)
    for name, layer in quantized.items():
        weight = layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized, name
        assert weight.dtype == torch.uint8 and weight.quant_type == "nf4", name
        assert weight.compress_statistics and weight.quant_state.nested, name  # double quantization
        assert layer.compute_dtype == torch.bfloat16 and layer.bias is None, name
    dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert dense == ["lm_head"] and model.lm_head.weight.dtype == torch.bfloat16
    assert model.is_loaded_in_4bit and model.config.quantization_config.bnb_4bit_use_double_quant
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if n.endswith("norm"))
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_nf4_holds_the_seeded_dense_weights():
    quantized = pb.build_hf_nf4_model(TINY, "cpu", seed=3)
    dense = pb.build_hf_nf4_model(TINY, "cpu", seed=3, quantization="none")
    again = pb.build_hf_nf4_model(TINY, "cpu", seed=3, quantization="none")
    for (name, a), b in zip(dense.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = quantized.get_submodule(name).weight
        restored = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        reference = dense.get_submodule(name).weight.float()
        assert abs(reference.std().item() - pb.INIT_STD) < 0.002
        assert (restored - reference).norm() / reference.norm() < 0.12  # NF4 error on Gaussian weights: ~0.09
    assert torch.equal(quantized.lm_head.weight, dense.lm_head.weight)


def test_generate_returns_exactly_batch_times_new_tokens():
    model = pb.add_random_adapters(pb.build_hf_nf4_model(TINY, "cpu"), 3)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)  # PEFT's bnb path
    for mode in pb.MODES:
        row = pb.run_peft_generate(model, batch_size=3, prompt_len=5, new_tokens=4, mode=mode, vocab_size=VOCAB)
        assert set(row) == {"mode", "batch_size", "prompt_len", "new_tokens", "generated_tokens", "wall_s",
                            "tokens_per_s"}
        assert row["mode"] == mode and row["generated_tokens"] == 3 * 4
        assert row["tokens_per_s"] == pytest.approx(12 / row["wall_s"])


def test_adapters_change_outputs_noticeably_but_boundedly():
    model = pb.add_random_adapters(pb.build_hf_nf4_model(TINY, "cpu"), 3)
    ids = pb.random_prompt_ids(3, 6, VOCAB, seed=1)
    with torch.no_grad():
        base = model(input_ids=ids, adapter_names=["__base__"] * 3).logits.float()
        adapted = model(input_ids=ids, adapter_names=["a0", "a1", "a2"]).logits.float()
    relative = ((adapted - base).norm(dim=-1) / base.norm(dim=-1)).mean(dim=1)  # per row
    assert torch.all(relative > 0.05) and torch.all(relative < 1.0), relative
    base_tokens = pb.generate_tokens(model, ids, pb.adapter_names_for(model, "base", 3), 8)
    adapted_tokens = pb.generate_tokens(model, ids, pb.adapter_names_for(model, "distinct", 3), 8)
    assert not torch.equal(base_tokens, adapted_tokens)


def test_mixed_batch_rows_equal_rows_generated_alone():
    model = fp32_model(4)
    ids = pb.random_prompt_ids(5, 7, VOCAB, seed=2)
    for names in (pb.adapter_names_for(model, "distinct", 4), ["a2", "__base__", "a0", "a2", "a3"]):
        batch = ids[:len(names)]
        together = pb.generate_tokens(model, batch, names, 6)
        for i, name in enumerate(names):
            alone = pb.generate_tokens(model, batch[i:i + 1], [name], 6)
            assert torch.equal(together[i:i + 1], alone), (names, i)
    distinct = pb.generate_tokens(model, ids[:4], pb.adapter_names_for(model, "distinct", 4), 6)
    assert len({tuple(row) for row in distinct.tolist()}) > 1


def test_fast_clone_builds_what_add_adapter_builds():
    fast, slow = fp32_model(3, seed=5), fp32_model(3, seed=5, fast=False)
    assert list(fast.peft_config) == list(slow.peft_config) == ["a0", "a1", "a2"]
    assert fast.peft_config["a2"].to_dict() == slow.peft_config["a2"].to_dict()
    fast_layers = {n: m for n, m in fast.named_modules() if isinstance(m, LoraLayer)}
    slow_layers = {n: m for n, m in slow.named_modules() if isinstance(m, LoraLayer)}
    assert fast_layers.keys() == slow_layers.keys() and len(fast_layers) == NUM_PROJECTIONS
    for name, layer in fast_layers.items():
        other = slow_layers[name]
        for attr in (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant"):
            ours, theirs = getattr(layer, attr, {}), getattr(other, attr, {})
            assert list(ours.keys()) == list(theirs.keys()), (name, attr)
            for key in ours.keys():
                if isinstance(ours[key], nn.Module):
                    assert type(ours[key]) is type(theirs[key]), (name, attr, key)
                    for (pname, p), q in zip(ours[key].named_parameters(), theirs[key].parameters()):
                        assert p.dtype == q.dtype == torch.float32 and torch.equal(p, q), (name, attr, key, pname)
                else:
                    assert ours[key] == theirs[key], (name, attr, key)
        assert layer.lora_A["a1"].weight.data_ptr() != layer.lora_A["a2"].weight.data_ptr()
    ids = pb.random_prompt_ids(3, 5, VOCAB)
    names = pb.adapter_names_for(fast, "distinct", 3)
    assert torch.equal(pb.generate_tokens(fast, ids, names, 4), pb.generate_tokens(slow, ids, names, 4))


def test_adapter_weights_depend_on_seed_and_index_only():
    two, three = fp32_model(2), fp32_model(3)
    q_two = two.base_model.model.model.layers[1].self_attn.q_proj
    q_three = three.base_model.model.model.layers[1].self_attn.q_proj
    assert torch.equal(q_two.lora_B["a1"].weight, q_three.lora_B["a1"].weight)
    assert not torch.equal(q_three.lora_B["a1"].weight, q_three.lora_B["a2"].weight)
    assert torch.all(q_three.lora_A["a2"].weight != 0) and torch.all(q_three.lora_B["a2"].weight != 0)
    assert q_three.scaling["a2"] == 32 / 16


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="quantization must be one of"):
        pb.build_hf_nf4_model(TINY, "cpu", quantization="int8")
    model = fp32_model(2)
    with pytest.raises(ValueError, match="mode must be one of"):
        pb.run_peft_generate(model, 2, 4, 2, "mixed", VOCAB)
    with pytest.raises(ValueError, match="batch_size 3 needs adapters a0..a2.*2 adapter.*a2 is missing"):
        pb.run_peft_generate(model, 3, 4, 2, "distinct", VOCAB)
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        pb.run_peft_generate(model, 2, 4, 0, "shared", VOCAB)
    with pytest.raises(ValueError, match="num_adapters must be >= 1"):
        pb.add_random_adapters(pb.build_hf_nf4_model(TINY, "cpu"), 0)
    plain = pb.build_hf_nf4_model(TINY, "cpu", compute_dtype=torch.float32, quantization="none")
    assert pb.adapter_names_for(plain, "base", 2) is None
    assert pb.run_peft_generate(plain, 2, 4, 3, "base", VOCAB, warmup=False)["generated_tokens"] == 6
    with pytest.raises(ValueError, match="a0 is missing"):
        pb.adapter_names_for(plain, "shared", 2)


def test_baseline_table_runs_every_combination(tmp_path, capsys):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY))
    rows = pb.baseline_table(config_path, batches=(1, 2), prompt_len=4, new_tokens=2, device="cpu",
                             num_adapters=1)
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("base", 1), ("base", 2), ("shared", 1),
                                                           ("shared", 2), ("distinct", 1)]
    assert all(r["generated_tokens"] == r["batch_size"] * 2 for r in rows)
    printed = capsys.readouterr().out
    assert "skip distinct batch=2" in printed and printed.count("tok/s") == len(rows)
    assert set(pb.versions()) == {"torch", "cuda", "transformers", "peft", "bitsandbytes", "device"}
