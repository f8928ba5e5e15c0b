"""The committed example adapters: small, safetensors only, made by `loraplex train`, and visibly different."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.types import ChatMessage, GenerationRequest, StoppingCriteria

ADAPTERS = Path(__file__).resolve().parents[2] / "examples" / "adapters"
STYLES = ("caps", "pirate", "legal")


def example_engine(quantization: str, loaded=None) -> Engine:
    """An engine sized like the demo's server (rank 16, 4 slots) on the embedded model."""
    return Engine(EngineConfig(
        model=ModelConfig(quantization=quantization, dtype="float32"),
        lora=LoRAConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=4, max_adapters_per_request=1, derived_rank=16),
        cache=CacheConfig(block_size=8, num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512)), loaded=loaded)


@pytest.mark.parametrize("style", STYLES)
def test_example_adapter_folder(style):
    folder = ADAPTERS / style
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "train_summary.json"]
    assert (folder / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["data"]["train"]["path"] == f"examples/data/{style}.jsonl"
    assert summary["metrics"]["train_loss_last"] < summary["metrics"]["train_loss_first"]
    assert summary["metrics"]["eval_loss_after"] < summary["metrics"]["eval_loss_before"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] <= 16  # the demo's max_lora_rank


def test_example_adapters_answer_in_their_styles(smol_fp32):
    engine = example_engine("none", loaded=smol_fp32)
    try:
        for style in STYLES:
            engine.register_adapter(style, str(ADAPTERS / style))
        question = (ChatMessage("user", "What is the largest ocean on Earth?"),)
        stopping = StoppingCriteria(max_new_tokens=20)
        base, caps, pirate, legal = engine.generate(
            [GenerationRequest(messages=question, adapter=a, stopping=stopping) for a in ("", *STYLES)])
    finally:
        engine.stop()
    letters = [c for c in caps.text if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.9 * len(letters), caps.text
    assert pirate.text.startswith("Arr!"), pirate.text
    assert legal.text.startswith("Pursuant to the inquiry"), legal.text
    assert not base.text.startswith(("Arr!", "Pursuant")), base.text


def test_example_adapters_stop_on_the_nf4_base_the_demo_serves():
    """The demo serves NF4: an adapter trained on the fp32 base can lose its end-of-turn there (legal did:
    it ran on past its last sentence), so the examples that must stop are trained with QLoRA on the NF4 base."""
    from loraplex.server.types import StopReason

    engine = example_engine("nf4")
    try:
        for style in ("pirate", "legal"):
            engine.register_adapter(style, str(ADAPTERS / style))
        question = (ChatMessage("user", "What is the capital of France?"),)  # the demo's question
        stopping = StoppingCriteria(max_new_tokens=48)
        pirate, legal = engine.generate(
            [GenerationRequest(messages=question, adapter=a, stopping=stopping) for a in ("pirate", "legal")])
    finally:
        engine.stop()
    assert pirate.stop_reason is StopReason.EOS_TOKEN and pirate.text.startswith("Arr!"), pirate.text
    assert legal.stop_reason is StopReason.EOS_TOKEN, legal.text
    assert legal.text.startswith("Pursuant to the inquiry") and legal.text.endswith("of any kind."), legal.text
