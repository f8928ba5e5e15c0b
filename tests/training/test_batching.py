"""Packing: rows never overflow, every example lands once, and no token attends across examples."""
from __future__ import annotations

import random

import torch

from loraplex.training.batching import Collator, pack, unpacked
from loraplex.training.encode import IGNORE, Encoded


def example(n: int, seed: int) -> Encoded:
    rng = random.Random(seed)
    ids = tuple(rng.randrange(100, 40000) for _ in range(n))
    return Encoded(ids, (IGNORE,) + ids[1:])


def test_pack_is_tight_deterministic_and_complete():
    rng = random.Random(0)
    encoded = [example(rng.randint(3, 60), i) for i in range(200)]
    rows, stats = pack(encoded, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(tuple(r["input_ids"]) for r in rows) == sorted(tuple(r["input_ids"]) for r in pack(encoded, 64)[0])
    members = sorted(ids for r in rows for ids in _split(r))
    assert members == sorted(e.input_ids for e in encoded)
    assert stats.tokens == sum(len(e.input_ids) for e in encoded) and stats.fill > 0.9
    assert stats.rows == len(rows) <= 1.1 * stats.tokens / 64  # within 10% of the fewest rows possible


def _split(row):
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [tuple(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]


def test_collator_pads_and_marks_rows():
    encoded = [example(5, 1), example(3, 2), example(7, 3)]
    rows, _ = pack(encoded, 9)
    batch = Collator(pad_token_id=2)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}
    assert batch["num_tokens"].item() == 15 and batch["input_ids"].shape == (2, 8)
    assert (batch["labels"][batch["input_ids"] == 2] == IGNORE).all()
    plain = Collator(pad_token_id=2, chunked_loss=True)(unpacked(encoded))
    assert set(plain) == {"input_ids", "labels", "attention_mask", "num_tokens", "logits_to_keep"}
    assert plain["attention_mask"].sum().item() == 15 and plain["input_ids"].shape == (3, 7)


def test_packed_rows_do_not_attend_across_examples(hf_smol_fp32):
    """Logits of each example inside a packed, padded row equal those of the example run alone."""
    encoded = [example(9, 11), example(4, 12), example(6, 13), example(12, 14)]
    rows, _ = pack(encoded, 24)
    batch = Collator(pad_token_id=2)(rows)
    with torch.no_grad():
        packed = hf_smol_fp32(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits
        leaky = hf_smol_fp32(input_ids=batch["input_ids"], use_cache=False).logits
    checked = 0
    for b, row in enumerate(rows):
        start = 0
        for ids in _split(row):
            with torch.no_grad():
                alone = hf_smol_fp32(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            got = packed[b, start:start + len(ids)]
            torch.testing.assert_close(got, alone, atol=2e-4, rtol=1e-4)
            if start > 0:  # the control: without the position restart the later examples do change
                assert (leaky[b, start:start + len(ids)] - alone).abs().max() > 1e-2
            start += len(ids)
            checked += 1
    assert checked == 4
