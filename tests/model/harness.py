"""Test helper: drive our CausalLM through paged steps (many sequences, any mix of prefill chunks and decodes),
and compare against transformers.

A step is a list of `SeqChunk`s, one per sequence: its block table, how many of its tokens are already in the KV
cache, and the new tokens it feeds. `run_step` builds what the engine would (concatenated positions, attention
meta, cos/sin, logits indices) and returns the next-token logits of each sequence (or of every new token).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.server.engine.kv_cache import allocate_kv_cache
from loraplex.server.attention.meta import AttentionStepMeta
from loraplex.server.model.layers import rotary_cos_sin
from loraplex.server.model.llama import CausalLM, ForwardContext


@dataclass
class SeqChunk:
    block_table: list[int]
    cached: int
    """Tokens of this sequence already written to the cache by earlier steps."""
    tokens: list[int]
    """New tokens fed this step (a prefill chunk, or one decode token)."""

    @property
    def context_len(self) -> int:
        return self.cached + len(self.tokens)


def new_kv_cache(model: CausalLM, num_blocks: int, block_size: int):
    return allocate_kv_cache(model.arch, num_blocks=num_blocks, block_size=block_size, dtype=model.dtype,
                             device=model.device)


_ARCH = object()


def run_step(model: CausalLM, kv_cache, chunks: list[SeqChunk], block_size: int, all_tokens: bool = False,
             sliding_window=_ARCH) -> torch.Tensor:
    """Logits [num_seqs, vocab] for the last new token of each chunk (or [sum of new tokens, vocab]).
    sliding_window overrides the model's (negative controls only)."""
    num_blocks = kv_cache[0][0].shape[0]
    for c in chunks:
        assert c.tokens, "every sequence of a step feeds at least one token"
        assert 0 not in c.block_table, "block 0 is reserved for padding"
        assert all(0 < b < num_blocks for b in c.block_table)
        assert len(c.block_table) * block_size >= c.context_len, "block table too short for the context"
    device = model.device
    query_lens = [len(c.tokens) for c in chunks]
    ids = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(c.cached, c.context_len) for c in chunks])
    meta = AttentionStepMeta.from_lists(
        block_tables=[c.block_table for c in chunks], context_lens=[c.context_len for c in chunks],
        query_lens=query_lens, block_size=block_size, device=device)
    cos, sin = rotary_cos_sin(positions.to(device), model.inv_freq, model.dtype)
    if all_tokens:
        logits_indices = torch.arange(len(ids))
    else:
        logits_indices = torch.cumsum(torch.tensor(query_lens), 0) - 1
    ctx = ForwardContext(attn=meta, cos=cos, sin=sin, kv_caches=kv_cache, lora=None, lora_stacks=None,
                         logits_indices=logits_indices.to(device))
    if sliding_window is _ARCH:
        return model(ids, ctx)
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    try:  # a negative control: run the layers with another window than the architecture's
        for layer in model.model.layers:
            layer.self_attn.sliding_window = sliding_window
        return model(ids, ctx)
    finally:
        for layer, window in zip(model.model.layers, windows):
            layer.self_attn.sliding_window = window


class PagedSequence:
    """One sequence fed through steps: remembers its block table and how much of it is cached."""

    def __init__(self, tokens: list[int], block_table: list[int]):
        self.tokens = list(tokens)
        self.block_table = block_table
        self.cached = 0

    def chunk(self, n: int | None = None) -> SeqChunk:
        """The next n not-yet-cached tokens (all of them when n is None) as this step's chunk."""
        end = len(self.tokens) if n is None else self.cached + n
        assert self.cached < end <= len(self.tokens)
        return SeqChunk(self.block_table, self.cached, self.tokens[self.cached:end])

    def advance(self, chunk: SeqChunk) -> None:
        assert chunk.cached == self.cached
        self.cached = chunk.context_len


def step(model: CausalLM, kv_cache, block_size: int, feeds: list[tuple[PagedSequence, int | None]],
         all_tokens: bool = False) -> torch.Tensor:
    """One step for several PagedSequences: (sequence, how many new tokens; None = the rest)."""
    chunks = [seq.chunk(n) for seq, n in feeds]
    logits = run_step(model, kv_cache, chunks, block_size, all_tokens=all_tokens)
    for (seq, _), c in zip(feeds, chunks):
        seq.advance(c)
    return logits


def blocks_needed(length: int, block_size: int) -> int:
    return -(-length // block_size)


def scattered_block_tables(lengths: list[int], block_size: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Non-contiguous, interleaved block tables (a random permutation of blocks 1..N) and the num_blocks
    a cache needs to hold them (N + 1, counting the reserved block 0)."""
    counts = [blocks_needed(n, block_size) for n in lengths]
    total = sum(counts)
    perm = (torch.randperm(total, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(perm[start:start + n])
        start += n
    return tables, total + 1


@torch.inference_mode()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, vocab] (fp32) for one unpadded sequence."""
    out = hf_model(input_ids=torch.tensor([ids], dtype=torch.int64))
    return out.logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| (Frobenius); NaN anywhere gives NaN, which fails every <= check."""
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    """Re-draw every parameter so that attention is peaked (HF's 0.02 init makes it nearly uniform, which
    hides position and mask errors): weights and biases N(0, std), norm weights 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(std * noise)


def saved_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
