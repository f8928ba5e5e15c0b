"""Real PEFT adapters for the embedded model, and the PEFT model that is their oracle."""
from __future__ import annotations

import pytest
import torch

# Different ranks, alphas, target sets, rsLoRA and rank/alpha patterns.
ADAPTER_SPECS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_r16": dict(r=16, lora_alpha=16,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp_r8_rslora": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "ko_r32_patterns": dict(r=32, lora_alpha=16, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 2},
                            alpha_pattern={"k_proj": 64}),
}


def randomize_lora(model, adapter_name: str, seed: int, b_std: float = 0.6) -> None:
    """Non-zero A and B so every adapter visibly changes the output (PEFT inits B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f"lora_A.{adapter_name}." in name:
            param.data = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
        elif f"lora_B.{adapter_name}." in name:
            param.data = torch.randn(param.shape, generator=gen) * b_std / param.shape[1] ** 0.5


@pytest.fixture(scope="session")
def peft_adapters(embedded_dir, tmp_path_factory):
    """(PeftModel holding every adapter of ADAPTER_SPECS, {name: saved PEFT folder})."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32).eval()
    peft_model = None
    folders = {}
    for i, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec)
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        randomize_lora(peft_model, name, seed=100 + i)
        peft_model.save_pretrained(str(root), selected_adapters=[name])
        folders[name] = root / name if (root / name).is_dir() else root
    peft_model.eval()
    return peft_model, folders


def peft_greedy(peft_model, prompt_ids: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
    """PEFT running one request alone: greedy, exactly max_new_tokens new tokens."""
    ids = torch.tensor([prompt_ids], device=peft_model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=2)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt_ids):].tolist()
