"""Training on the real embedded model (CPU): the loss falls (LoRA and QLoRA), resume equals an
uninterrupted run, and the adapter gives the same greedy text in PEFT and in our engine."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.types import GenerationRequest, StoppingCriteria
from loraplex.training.train import train

from .conftest import caps_chat, quick, write_jsonl

QUESTION = "What is the tallest mountain in the world?"


@pytest.fixture(scope="module")
def caps_run(tmp_path_factory):
    """LoRA r8 on q/k/v/o, 10 steps on ALL-CAPS answers, 4 examples held out; TensorBoard on."""
    root = tmp_path_factory.mktemp("caps")
    data = write_jsonl(root / "caps.jsonl", caps_chat(40))
    cfg = quick(data, root / "caps", r=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                max_steps=10, batch_size=4, max_length=96, learning_rate=3e-3, eval_split=0.1, tensorboard=True)
    return data, train(cfg, say=lambda _: None)


def test_lora_loss_falls_and_the_folder_is_a_peft_adapter(caps_run, embedded_dir):
    data, result = caps_run
    m = result.summary["metrics"]
    assert m["steps"] == 10 and m["tokens"] > 0 and m["tokens_per_second"] > 0
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.3, m
    assert m["train_loss_last"] < m["train_loss_first"], result.summary["loss_curve"]
    assert m["eval_perplexity_after"] == pytest.approx(torch.tensor(m["eval_loss_after"]).exp().item(), rel=1e-5)
    out = result.out
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "train_summary.json"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        8, 16, ["k_proj", "o_proj", "q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 30 * 4 * 2 and all(w.abs().sum() > 0 for w in weights.values())
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card
    assert result.summary["base"]["weights_sha256"] in card and result.summary["base"]["config_sha256"] in card
    assert f"{m['eval_loss_after']:.4f}" in card


def test_trained_adapter_same_greedy_text_in_peft_and_engine(caps_run, smol_fp32, embedded_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = caps_run
    engine = Engine(EngineConfig(
        model=ModelConfig(quantization="none", dtype="float32"),
        lora=LoRAConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2, max_adapters_per_request=1, derived_rank=16),
        cache=CacheConfig(block_size=8, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256)), loaded=smol_fp32)
    try:
        engine.register_adapter("caps", str(result.out))
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                      add_generation_prompt=True)
        stopping = StoppingCriteria(max_new_tokens=12, ignore_eos=True)
        ours, ours_base = engine.generate([GenerationRequest(prompt=prompt, adapter="caps", stopping=stopping),
                                           GenerationRequest(prompt=prompt, stopping=stopping)])
    finally:
        engine.stop()
    base = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(result.out)).eval()
    ids = torch.tensor([engine.tokenizer(prompt).input_ids])
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=2,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
    assert ours.token_ids == expected, (ours.text, engine.tokenizer.decode(expected))
    assert ours.token_ids != ours_base.token_ids, "the adapter should change the answer"
    letters = [c for c in ours.text if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.8 * len(letters), ours.text  # it learned the style


def test_qlora_loss_falls(tmp_path, embedded_dir):
    data = write_jsonl(tmp_path / "caps.jsonl", caps_chat(16))
    cfg = quick(data, tmp_path / "q", qlora=True, gradient_checkpointing=True, max_steps=3, batch_size=4,
                max_length=64, learning_rate=5e-3, eval_split=0.25, rslora=True)
    result = train(cfg, say=lambda _: None)
    m = result.summary["metrics"]
    assert result.summary["base"]["quantization"] == "nf4"
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1, m
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4


def test_resume_equals_an_uninterrupted_run(tmp_path):
    """4 steps straight vs. 2 steps, stop, resume from that checkpoint for 2 more: the same adapter."""
    data = write_jsonl(tmp_path / "caps.jsonl", caps_chat(12))
    common = dict(max_steps=4, batch_size=2, max_length=48, save_steps=2, save_total_limit=3, eval_split=0.0,
                  dropout=0.1, packing=True, seed=7, r=2, target_modules=("q_proj",))
    straight = train(quick(data, tmp_path / "straight", **common), say=lambda _: None)
    resumed_out = tmp_path / "resumed"
    shutil.copytree(straight.out / "checkpoints" / "checkpoint-2", resumed_out / "checkpoints" / "checkpoint-2")
    resumed = train(quick(data, resumed_out, resume="latest", **common), say=lambda _: None)
    a = load_file(str(straight.out / "adapter_model.safetensors"))
    b = load_file(str(resumed.out / "adapter_model.safetensors"))
    middle = load_file(str(resumed_out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(middle[k], a[k]) for k in a), "steps 3-4 must have changed the weights"
    (steps_a, losses_a), (steps_b, losses_b) = (zip(*r.summary["loss_curve"]) for r in (straight, resumed))
    assert steps_b == steps_a == (1, 2, 3, 4) and losses_b == pytest.approx(losses_a, rel=1e-5)
    assert resumed.summary["metrics"]["tokens"] == straight.summary["metrics"]["tokens"]
