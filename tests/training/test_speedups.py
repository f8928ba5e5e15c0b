"""Checkpointing only some layers gives the same gradients; Liger resolves off (or refuses) without a GPU."""
from __future__ import annotations

import pytest
import torch

from loraplex.server.errors import ConfigError
from loraplex.training.kernels import resolve_liger, restored_modeling_modules
from loraplex.training.model import decoder_layers, limit_checkpointing


@pytest.mark.parametrize("layers", [0, 1])
def test_partial_checkpointing_keeps_gradients(tiny_base, layers):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for limit in (None, layers):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights="gaussian", task_type="CAUSAL_LM")).train()
        if limit is not None:
            assert limit_checkpointing(model, limit) == layers
            assert [b.gradient_checkpointing for b in decoder_layers(model)] == [i < layers for i in range(2)]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_liger_is_off_or_refused_without_cuda():
    assert resolve_liger("auto", cuda=False) is False and resolve_liger("off", cuda=False) is False
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_liger("on", cuda=False)


def test_modeling_modules_are_restored():
    from transformers.models.llama import modeling_llama

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    with restored_modeling_modules():
        modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm = print, dict
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm


def test_qlora_preparation_keeps_frozen_tables_in_their_dtype(tiny_base):
    """prepare_model_for_kbit_training upcasts everything to fp32: the norms stay fp32, the embedding does not."""
    from transformers import AutoModelForCausalLM

    from loraplex.training.model import add_lora

    from .conftest import quick

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16)
    model = add_lora(base, quick("unused.jsonl", "unused", qlora=True, gradient_checkpointing=True))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.get_base_model().model.norm.weight.dtype == torch.float32


def test_lora_inputs_stay_in_the_autocast_dtype(tiny_base):
    """PEFT upcasts each LoRA input to its fp32 weights; switched off, lora_A sees the bf16 activation as is and the
    fp32 LoRA weights still get gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.training.model import keep_lora_inputs_in_compute_dtype

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    seen = []
    lora_a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    for m in lora_a:
        m.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.randint(3, 1000, (1, 8))
    for switch in (False, True):
        if switch:
            assert keep_lora_inputs_in_compute_dtype(model) == len(lora_a) == 2
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        assert set(seen) == ({torch.bfloat16} if switch else {torch.float32})
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters() if p.requires_grad)
