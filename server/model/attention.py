"""Paged attention in PyTorch: KV blocks addressed through block tables, any mix of prefill and decode.

KV cache of one layer: k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]. A token at
position p of a sequence lives in flat slot block_table[p // block_size] * block_size + p % block_size.
Block 0 is never handed out: padding indices point at it, so padded keys read finite zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMeta:
    """Built once per step (O(sequences) Python), shared by every layer."""

    positions: torch.Tensor
    """[T] int64: absolute position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """[T] int64: flat KV slot written by each token of the step."""
    kv_gather: torch.Tensor
    """[B, Lk] int64: flat KV slots of each sequence's context, padded with slot 0."""
    mask: torch.Tensor
    """[B, 1, Lq, Lk] bool: query i of sequence b may attend key j."""
    token_seq: torch.Tensor
    """[T] int64: the sequence (row) each token belongs to."""
    token_offset: torch.Tensor
    """[T] int64: the token's index within its sequence's chunk (query row)."""
    num_seqs: int
    max_query_len: int
    decode_only: bool
    """Every sequence contributes exactly one token, in row order: the padded layout is the flat one."""


def build_attention_meta(block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
                         block_size: int, sliding_window: int | None, device: torch.device) -> AttentionMeta:
    """Sequence b contributes its last query_lens[b] tokens, at positions [context_lens[b] - query_lens[b],
    context_lens[b]); context_lens[b] counts every token of b in the cache after this step's writes.

    Index math runs in numpy: these arrays are small, and torch's CPU ops cost more in dispatch and
    thread wake-ups than in work."""
    num_seqs = len(block_tables)
    ctx = np.asarray(context_lens, dtype=np.int64)
    qlen = np.asarray(query_lens, dtype=np.int64)
    max_query_len, max_context = int(qlen.max()), int(ctx.max())
    tables = np.zeros((num_seqs, -(-max_context // block_size)), dtype=np.int64)
    for b, table in enumerate(block_tables):
        used = table[:-(-context_lens[b] // block_size)]
        tables[b, :len(used)] = used
    key_pos = np.arange(max_context)
    kv_gather = tables[:, key_pos // block_size] * block_size + key_pos % block_size
    kv_gather[key_pos[None, :] >= ctx[:, None]] = 0

    token_seq = np.repeat(np.arange(num_seqs), qlen)
    starts = np.cumsum(qlen) - qlen
    token_offset = np.arange(int(qlen.sum())) - np.repeat(starts, qlen)
    token_pos = np.repeat(ctx - qlen, qlen) + token_offset
    slot_mapping = kv_gather[token_seq, token_pos]

    # Query positions in the padded [B, Lq] layout; padded rows get position 0 (they see key 0 only).
    q_pos = np.zeros((num_seqs, max_query_len), dtype=np.int64)
    q_pos[token_seq, token_offset] = token_pos
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    if device.type == "cuda":
        def to(a):
            return torch.from_numpy(a).pin_memory().to(device, non_blocking=True)
    else:
        to = torch.from_numpy
    return AttentionMeta(
        positions=to(token_pos), slot_mapping=to(slot_mapping), kv_gather=to(kv_gather),
        mask=to(np.ascontiguousarray(mask[:, None])), token_seq=to(token_seq), token_offset=to(token_offset),
        num_seqs=num_seqs, max_query_len=max_query_len, decode_only=max_query_len == 1 and len(token_seq) == num_seqs)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] stored at their flat slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                    scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], attending each token's sequence context."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache.view(-1, kv_heads, head_dim)[meta.kv_gather]  # [B, Lk, kvh, d]
    values = v_cache.view(-1, kv_heads, head_dim)[meta.kv_gather]
    if meta.decode_only:
        return _decode_attention(q, keys, values, meta.mask, scale)
    queries = q.new_zeros(meta.num_seqs, meta.max_query_len, num_heads, head_dim)
    queries[meta.token_seq, meta.token_offset] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask,
        scale=scale, enable_gqa=num_heads != kv_heads)
    return out.transpose(1, 2)[meta.token_seq, meta.token_offset]  # [T, heads, d]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence, grouped by KV head (GQA without expanding K/V), softmax in fp32.

    Two batched matmuls in the compute dtype; SDPA's math fallback (the only one taking this mask
    with GQA) upcasts everything to fp32 and expands K/V, several times the memory traffic."""
    batch, _, kv_heads, head_dim = keys.shape
    group = q.shape[1] // kv_heads
    q = q.view(batch, kv_heads, group, head_dim)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float() * scale  # [B, kvh, G, Lk]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, Lk]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, kvh, G, d]
    return out.reshape(batch, kv_heads * group, head_dim)
