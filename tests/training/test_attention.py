"""loraplex_varlen: packed rows attend within each example only, equal to SDPA on each example alone."""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.training.attention import VARLEN, boundaries, register, resolve_attention, segment_attention
from loraplex.training.batching import Collator, pack, unpacked
from loraplex.training.encode import IGNORE, Encoded


@pytest.fixture(scope="module")
def tiny_lora(tiny_base):
    """The tiny GQA Llama (4 query heads, 2 kv heads) with LoRA on all linears, non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32, attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    return model


def examples(vocab: int) -> list[Encoded]:
    rng = random.Random(3)
    out = []
    for n in (9, 17, 5, 30, 12, 3):
        ids = tuple(rng.randrange(3, vocab) for _ in range(n))
        out.append(Encoded(ids, (IGNORE,) * (n // 3) + ids[n // 3:]))
    return out


def set_attention(model, name: str) -> None:
    model.get_base_model().set_attn_implementation(name)


def test_boundaries_split_at_restarts_and_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 3]])
    cu, longest = boundaries(positions)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12, 14, 18] and longest == 6


def test_segment_attention_is_causal_within_segments_only():
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = segment_attention(q, k, v, cu, scale=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[4:], v2[4:] = torch.randn(6, 2, 8), torch.randn(6, 2, 8)  # the second segment's keys never reach the first
    torch.testing.assert_close(segment_attention(q, k2, v2, cu, scale=0.3)[:4], out[:4])
    assert (segment_attention(q, k2, v2, cu, scale=0.3)[4:] - out[4:]).abs().max() > 1e-2


def test_varlen_packed_logits_equal_each_example_alone(tiny_lora):
    encoded = examples(tiny_lora.config.vocab_size)
    rows, _ = pack(encoded, 40)
    batch = Collator(pad_token_id=2, varlen=True)(rows)
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    register()
    set_attention(tiny_lora, VARLEN)
    try:
        with torch.no_grad():
            packed = tiny_lora(**{k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}).logits
    finally:
        set_attention(tiny_lora, "sdpa")
    checked = 0
    for b, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            with torch.no_grad():
                alone = tiny_lora(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            torch.testing.assert_close(packed[b, start:end], alone, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == len(encoded)


@pytest.mark.parametrize("layout", ["packed", "padded", "full"])
def test_varlen_loss_and_grads_equal_sdpa(tiny_lora, layout):
    """Packed rows (boundaries from the collator), padded rows (from the 2D mask) and full rows (one example each,
    no boundaries passed) train as with SDPA."""
    encoded = examples(tiny_lora.config.vocab_size)
    if layout == "full":
        encoded = [e for e in encoded if len(e.input_ids) == 12] * 3
    rows = unpacked(encoded) if layout == "padded" else pack(encoded, 40 if layout == "packed" else 12)[0]
    results = []
    for attention in ("sdpa", VARLEN):
        register()
        set_attention(tiny_lora, attention)
        batch = Collator(pad_token_id=2, varlen=attention == VARLEN)(rows)
        batch.pop("num_tokens")
        assert ("cu_seq_lens_q" in batch) == (attention == VARLEN and layout == "packed")
        tiny_lora.zero_grad()
        loss = tiny_lora(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in tiny_lora.named_parameters() if p.requires_grad}))
    set_attention(tiny_lora, "sdpa")
    (loss_sdpa, grads_sdpa), (loss_varlen, grads_varlen) = results
    torch.testing.assert_close(loss_varlen, loss_sdpa, atol=1e-6, rtol=1e-5)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_varlen[name], grad, atol=1e-6, rtol=1e-4)


def test_auto_attention_keeps_sdpa_on_the_cpu():
    assert resolve_attention("auto", cuda=False, packing=True) == "sdpa"
    assert resolve_attention("varlen", cuda=False, packing=False) == "varlen"
