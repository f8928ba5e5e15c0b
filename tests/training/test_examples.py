"""The committed example adapters: small, safetensors only, made by `loraplex train`, and visibly different."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.demo import QUESTION
from loraplex.server.types import AdapterWeight, ChatMessage, GenerationRequest, StopReason, StoppingCriteria

ADAPTERS = Path(__file__).resolve().parents[2] / "examples" / "adapters"
HELDOUT = ADAPTERS.parent / "data" / "qa_heldout.jsonl"
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
    assert (folder / "adapter_model.safetensors").stat().st_size < 20 * 2**20  # caps: r16 on all linear, fp32
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


def nf4_demo_engine() -> Engine:
    """The NF4 base the demo serves, with room for the demo's 2-adapter mix and a batch of held-out questions."""
    return Engine(EngineConfig(
        model=ModelConfig(quantization="nf4", dtype="float32"),
        lora=LoRAConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=4, max_adapters_per_request=2, derived_rank=16),
        cache=CacheConfig(block_size=8, num_blocks=640),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=1024)))


def has_fact(style: str, text: str, fact: str) -> bool:
    """The fact in the style's casing: PARIS for caps, Paris for the others (either for a caps+pirate mix)."""
    if style == "caps":
        return fact.upper() in text
    if style == "mix":
        return fact.upper() in text or fact in text
    return fact in text


def test_example_adapters_keep_the_facts_on_the_nf4_base_the_demo_serves():
    """The demo serves NF4 and asks QUESTION: every example adapter and the 0.5/0.5 caps+pirate mix name Paris in
    their style and stop at EOS. Trained on the fp32 base, legal lost its end-of-turn on NF4; trained on 40 rows,
    caps said TOKYO. Held-out questions (examples/data/qa_heldout.jsonl, not trained on) keep their facts too:
    measured 2026-12-02 (of 18): pirate 13, legal 15, caps 1. caps learns its training answers but not ALL CAPS
    for facts it was not shown (ITALY -> BERN), so it has no count bar, only that its held-out answers are ALL CAPS;
    pirate and legal must keep 11.
    """
    heldout = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    asks = [(style, QUESTION, "Paris") for style in (*STYLES, "mix")]
    asks += [(style, row["instruction"], row["fact"]) for style in STYLES for row in heldout]
    engine = nf4_demo_engine()
    try:
        for style in STYLES:
            engine.register_adapter(style, str(ADAPTERS / style))
        mix = (AdapterWeight("caps", 0.5), AdapterWeight("pirate", 0.5))
        stopping = StoppingCriteria(max_new_tokens=48)
        results = engine.generate([
            GenerationRequest(messages=(ChatMessage("user", question),), stopping=stopping,
                              **(dict(adapters=mix) if style == "mix" else dict(adapter=style)))
            for style, question, _ in asks])
    finally:
        engine.stop()
    demo = {style: result for (style, _, _), result in zip(asks, results[:4])}
    for style, result in demo.items():
        assert has_fact(style, result.text, "Paris"), (style, result.text)
        assert result.stop_reason is StopReason.EOS_TOKEN, (style, result.text)
    assert demo["caps"].text.upper() == demo["caps"].text, demo["caps"].text
    assert demo["pirate"].text.startswith("Arr!"), demo["pirate"].text
    legal = demo["legal"].text
    assert legal.startswith("Pursuant to the inquiry") and legal.endswith("of any kind."), legal
    kept = {style: [] for style in STYLES}
    for (style, question, fact), result in zip(asks[4:], results[4:]):
        kept[style].append(has_fact(style, result.text, fact) or f"{question} -> {result.text}")
    for style in ("pirate", "legal"):
        assert sum(m is True for m in kept[style]) >= 11, (style, [m for m in kept[style] if m is not True])
    caps_heldout = [result.text for (style, _, _), result in zip(asks[4:], results[4:]) if style == "caps"]
    assert all(text.upper() == text for text in caps_heldout), caps_heldout  # the style holds where facts do not
