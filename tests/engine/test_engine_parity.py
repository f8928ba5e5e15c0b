"""The engine against PEFT on the real embedded model: mixed batches, mixes, joins, cancels, eviction."""
from __future__ import annotations

import pytest
import torch

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.types import (AdapterWeight, GenerationRequest, SamplingParams, StopReason,
                                   StoppingCriteria)

from .conftest import ADAPTER_SPECS, peft_greedy

PROMPTS = [
    "The three primary colors are",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Paris is the capital of",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 8


def make_engine(loaded, max_loras=8, num_blocks=256, block_size=8, max_tokens=256, **scheduler):
    config = EngineConfig(
        model=ModelConfig(quantization="none", dtype="float32"),
        lora=LoRAConfig(max_lora_rank=32, max_loras=max_loras, max_cpu_loras=16,
                        max_adapters_per_request=min(4, max_loras), derived_rank=32),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_tokens, **scheduler))
    return Engine(config, loaded=loaded)


def request(prompt, adapter="", adapters=(), tokens=NEW_TOKENS, **kw):
    return GenerationRequest(prompt=prompt, adapter=adapter, adapters=tuple(adapters),
                             stopping=StoppingCriteria(max_new_tokens=tokens, ignore_eos=True), **kw)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def model_fp32(request, smol_fp32, embedded_dir):
    """Our fp32 model on each device (the PEFT oracle always runs on the CPU in fp32)."""
    if request.param == "cpu":
        return smol_fp32
    from loraplex.server.model.loader import load_model

    return load_model(ModelConfig(path=str(embedded_dir), quantization="none", dtype="float32", device="cuda"))


@pytest.fixture(scope="module")
def engine(model_fp32, peft_adapters):
    _, folders = peft_adapters
    eng = make_engine(model_fp32)
    for name, folder in folders.items():
        eng.register_adapter(name, str(folder))
    yield eng
    eng.stop()


def tokenize(engine, prompt):
    return engine.tokenizer(prompt).input_ids


def test_mixed_batch_matches_peft_alone(engine, peft_adapters):
    """>= 4 adapters (ranks 2-32, several alphas and target sets), base rows and duplicates in ONE batch."""
    peft_model, _ = peft_adapters
    names = list(ADAPTER_SPECS)
    plan = [(PROMPTS[0], names[0]), (PROMPTS[1], names[1]), (PROMPTS[2], None), (PROMPTS[3], names[2]),
            (PROMPTS[4], names[3]), (PROMPTS[5], names[0]), (PROMPTS[0], None), (PROMPTS[3], names[1])]
    results = engine.generate([request(p, adapter=a or "") for p, a in plan])
    for (prompt, adapter), result in zip(plan, results):
        expected = peft_greedy(peft_model, tokenize(engine, prompt), adapter, NEW_TOKENS)
        assert result.token_ids == expected, f"{adapter or 'base'} on {prompt!r}"
        assert result.stop_reason is StopReason.MAX_TOKENS
    # adapters really change the output (otherwise the test above proves little)
    assert len({tuple(r.token_ids) for r, (p, _) in zip(results, plan) if p == PROMPTS[0]}) == 2


def test_all_requests_share_one_step(engine):
    """Admission puts every request of a mixed batch into the same forward steps."""
    names = list(ADAPTER_SPECS)
    handles = [engine.submit(request(PROMPTS[i % 6], adapter=names[i % 4] if i % 5 else "")) for i in range(6)]
    engine.step()
    assert len(engine.scheduler.running) == 6
    while not all(h.done for h in handles):
        engine.step()


def test_linear_mix_equals_peft_cat(engine, peft_adapters):
    """Exact weighted LINEAR mix (mixed ranks and targets) == PEFT add_weighted_adapter(..., 'cat')."""
    peft_model, _ = peft_adapters
    names, weights = ["qv_r4", "all_r16", "mlp_r8_rslora"], [0.7, 0.5, -0.4]
    mix_name = "cat_mix"
    if mix_name not in peft_model.peft_config:
        peft_model.add_weighted_adapter(names, weights, mix_name, combination_type="cat")
    prompt = PROMPTS[3]
    [ours, single] = engine.generate([
        request(prompt, adapters=[AdapterWeight(n, w) for n, w in zip(names, weights)]),
        request(prompt, adapter="all_r16")])
    expected = peft_greedy(peft_model, tokenize(engine, prompt), mix_name, NEW_TOKENS)
    assert ours.token_ids == expected
    assert ours.token_ids != single.token_ids
    assert ours.adapter_versions == {n: 1 for n in names}


def test_join_mid_generation_matches_alone(engine, peft_adapters):
    peft_model, _ = peft_adapters
    first = engine.submit(request(PROMPTS[1], adapter="all_r16", tokens=12))
    for _ in range(4):
        engine.step()
    second = engine.submit(request(PROMPTS[4], adapter="ko_r32_patterns"))
    while not (first.done and second.done):
        engine.step()
    assert first.result().token_ids == peft_greedy(peft_model, tokenize(engine, PROMPTS[1]), "all_r16", 12)
    assert second.result().token_ids == peft_greedy(peft_model, tokenize(engine, PROMPTS[4]),
                                                    "ko_r32_patterns", NEW_TOKENS)


def test_chunked_prefill_matches_alone(model_fp32, peft_adapters):
    """A token budget smaller than the prompts forces prefill in chunks, beside running decodes."""
    peft_model, folders = peft_adapters
    eng = make_engine(model_fp32, max_tokens=16)
    eng.register_adapter("all_r16", str(folders["all_r16"]))
    prompt = " ".join(PROMPTS)
    results = eng.generate([request(prompt, adapter="all_r16"), request(PROMPTS[2])])
    assert results[0].token_ids == peft_greedy(peft_model, tokenize(eng, prompt), "all_r16", NEW_TOKENS)
    assert results[1].token_ids == peft_greedy(peft_model, tokenize(eng, PROMPTS[2]), None, NEW_TOKENS)
    eng.stop()


def test_cancel_frees_kv_blocks(engine):
    available = engine.block_manager.num_available_blocks
    handle = engine.submit(request(PROMPTS[5], adapter="qv_r4", tokens=200))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_available_blocks < available
    handle.cancel()
    engine.step()
    result = handle.result(timeout=5)
    assert result.stop_reason is StopReason.CANCELLED
    assert engine.block_manager.num_available_blocks == available
    assert sum(engine.cache.slot_refs()) == 0


def test_eviction_never_hits_an_adapter_in_use(model_fp32, peft_adapters):
    """Two slots, three adapters: the third waits for a slot; no running sequence loses its adapter."""
    peft_model, folders = peft_adapters
    eng = make_engine(model_fp32, max_loras=2)
    for name in ("qv_r4", "all_r16", "mlp_r8_rslora"):
        eng.register_adapter(name, str(folders[name]))
    plan = [(PROMPTS[0], "qv_r4", 10), (PROMPTS[1], "all_r16", 6), (PROMPTS[2], "mlp_r8_rslora", 6),
            (PROMPTS[3], "qv_r4", 6)]
    handles = [eng.submit(request(p, adapter=a, tokens=n)) for p, a, n in plan]
    while not all(h.done for h in handles):
        eng.step()
        for seq in eng.scheduler.running:  # every running sequence still finds its adapter in its slot
            for need, slot in zip(seq.needs, seq.slots):
                assert eng.cache._slots[slot].key == need.key
                assert eng.cache._slots[slot].refs > 0
    assert eng.cache.stats.evictions >= 1
    for (prompt, adapter, n), handle in zip(plan, handles):
        assert handle.result().token_ids == peft_greedy(peft_model, tokenize(eng, prompt), adapter, n)
    eng.stop()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nf4_close_to_peft_on_bitsandbytes(embedded_dir, peft_adapters, device):
    """Same fp32 weights quantized by the same bitsandbytes call on both sides (blocksize 64, double
    quant), dequantized and multiplied in fp32: the 4-bit weights are identical, so the greedy tokens
    should agree; we allow one late divergence in case of a near-tie from a different summation order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraplex.server.model.loader import load_model

    _, folders = peft_adapters
    loaded = load_model(ModelConfig(path=str(embedded_dir), quantization="nf4", dtype="float32", device=device))
    eng = make_engine(loaded)
    eng.register_adapter("all_r16", str(folders["all_r16"]))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(embedded_dir), quantization_config=bnb, dtype=torch.float32,
                                              device_map=device)
    for module in hf.modules():  # stay on bitsandbytes' standard NF4 path (see tests/model/test_hf_parity.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    peft_nf4 = PeftModel.from_pretrained(hf, str(folders["all_r16"]), adapter_name="all_r16").eval()
    for prompt, adapter in [(PROMPTS[0], "all_r16"), (PROMPTS[3], None)]:
        [ours] = eng.generate([request(prompt, adapter=adapter or "")])
        expected = peft_greedy(peft_nf4, tokenize(eng, prompt), adapter, NEW_TOKENS)
        agree = next((i for i, (a, b) in enumerate(zip(ours.token_ids, expected)) if a != b), NEW_TOKENS)
        assert agree >= NEW_TOKENS - 1, (ours.token_ids, expected)
    eng.stop()
