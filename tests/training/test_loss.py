"""The chunked loss equals transformers' loss, value and gradients, packed or padded."""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.training.batching import Collator, pack, unpacked
from loraplex.training.encode import IGNORE, Encoded
from loraplex.training.loss import ChunkedCausalLMLoss, supports_chunked_loss


@pytest.fixture(scope="module")
def lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # non-zero B so the LoRA gradients are not trivially equal
    return model


def encoded_examples(vocab: int) -> list[Encoded]:
    rng = random.Random(5)
    out = []
    for n in (9, 17, 5, 30, 12):
        ids = tuple(rng.randrange(3, vocab) for _ in range(n))
        prompt = n // 3
        out.append(Encoded(ids, (IGNORE,) * prompt + ids[prompt:]))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_items", [None, 100])
def test_chunked_loss_matches_the_model_loss(lora_model, packed, num_items):
    assert supports_chunked_loss(lora_model)
    examples = encoded_examples(lora_model.config.vocab_size)
    rows = pack(examples, 40)[0] if packed else unpacked(examples)
    batch = Collator(pad_token_id=2)(rows)
    batch.pop("num_tokens")
    labels = batch.pop("labels")
    lora_model.zero_grad()
    expected = lora_model(**batch, labels=labels, num_items_in_batch=num_items).loss
    expected.backward()
    expected_grads = grads(lora_model)

    chunked = ChunkedCausalLMLoss(lora_model, chunk_tokens=7)  # several chunks and a ragged last one
    try:
        lora_model.zero_grad()
        outputs = lora_model(**batch, logits_to_keep=1)
        assert outputs.logits.shape[1] == 1  # the full logits were never built
        loss = chunked(outputs, labels, num_items_in_batch=num_items)
        loss.backward()
    finally:
        chunked.close()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name, grad in grads(lora_model).items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
