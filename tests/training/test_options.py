"""Every data form trains end to end; options that must not change the math do not (tiny model, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraplex.training.train import train

from .conftest import caps_chat, quick, write_jsonl

FORMS = {
    "chat": caps_chat(8),
    "instruction": [{"instruction": f"Say {w}.", "input": "loudly" if i % 2 else "", "output": w.upper()}
                    for i, w in enumerate(["yes", "no", "maybe", "later", "now", "never", "always", "soon"])],
    "prompt_completion": [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)],
    "text": [{"text": f"Line {i}: the quick brown fox jumps over the lazy dog."} for i in range(8)],
}


@pytest.mark.parametrize("form", FORMS)
def test_every_data_form_trains(tmp_path, tiny_base, form):
    data = write_jsonl(tmp_path / f"{form}.jsonl", FORMS[form])
    result = train(quick(data, tmp_path / "out", base=str(tiny_base), eval_split=0.25, max_steps=2),
                   say=lambda _: None)
    s = result.summary
    assert s["data"]["train"]["form"] == form and s["data"]["train"]["examples"] == 6
    assert s["data"]["eval"]["held_out"] and s["data"]["eval"]["examples"] == 2
    assert s["metrics"]["steps"] == 2 and s["metrics"]["eval_loss_after"] is not None
    assert s["data"]["train"]["trained_tokens"] < s["data"]["train"]["tokens"]
    assert (result.out / "adapter_model.safetensors").is_file()


def test_separate_eval_file_and_all_linear(tmp_path, tiny_base):
    train_data = write_jsonl(tmp_path / "train.jsonl", FORMS["text"])
    eval_data = write_jsonl(tmp_path / "eval.jsonl", FORMS["text"][:3])
    result = train(quick(train_data, tmp_path / "out", base=str(tiny_base), eval_data=str(eval_data),
                         target_modules=("all-linear",)), say=lambda _: None)
    assert result.summary["data"]["train"]["examples"] == 8  # nothing held out
    assert result.summary["data"]["eval"]["path"] == str(eval_data) and not result.summary["data"]["eval"]["held_out"]
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def adapter_after(tmp_path, tiny_base, name, **overrides):
    data = write_jsonl(tmp_path / "caps.jsonl", caps_chat(12))
    values = dict(base=str(tiny_base), eval_split=0.0, max_steps=3, batch_size=3, seed=5, r=4,
                  target_modules=("all-linear",))
    values.update(overrides)
    result = train(quick(data, tmp_path / name, **values), say=lambda _: None)
    return load_file(str(result.out / "adapter_model.safetensors")), result.summary


@pytest.mark.parametrize("common, option", [
    ({}, dict(gradient_checkpointing=True)), ({}, dict(chunked_loss=False)),
    ({}, dict(gradient_checkpointing=True, checkpoint_layers=1)), ({}, dict(attention="varlen")),
    (dict(packing=True, max_length=160), dict(attention="varlen"))])
def test_options_that_must_not_change_training(tmp_path, tiny_base, common, option):
    reference, ref_summary = adapter_after(tmp_path, tiny_base, "reference", **common)
    other, summary = adapter_after(tmp_path, tiny_base, "other", **common, **option)
    assert summary["speedups"]["attention"] == option.get("attention", "sdpa")
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)
    assert [l for _, l in summary["loss_curve"]] == pytest.approx([l for _, l in ref_summary["loss_curve"]], rel=1e-4)
    assert any(reference[k].abs().sum() > 0 for k in reference if "lora_B" in k)


def test_packing_and_length_grouping_count_every_real_token_once(tmp_path, tiny_base):
    """One epoch in each batching mode sees exactly the data's tokens (padding is never counted)."""
    one_epoch = dict(max_steps=0, epochs=1.0, max_length=160)
    _, packed = adapter_after(tmp_path, tiny_base, "packed", packing=True, **one_epoch)
    _, grouped = adapter_after(tmp_path, tiny_base, "grouped", group_by_length=True, **one_epoch)
    _, plain = adapter_after(tmp_path, tiny_base, "plain", **one_epoch)
    rows = packed["data"]["packing"]["rows"]
    assert rows < 12 and packed["metrics"]["steps"] == -(-rows // 3) and plain["metrics"]["steps"] == 4
    data_tokens = plain["data"]["train"]["tokens"]
    assert plain["data"]["train"]["truncated"] == 0
    assert packed["metrics"]["tokens"] == grouped["metrics"]["tokens"] == plain["metrics"]["tokens"] == data_tokens
