"""Paged attention in PyTorch: KV blocks addressed through block tables, any mix of prefill and decode.

KV cache of one layer: k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]. A token at
position p of a sequence lives in flat slot block_table[p // block_size] * block_size + p % block_size.
Block 0 is never handed out: padding indices point at it, so padded keys read finite zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    context_lens[b]); context_lens[b] counts every token of b in the cache after this step's writes."""
    num_seqs = len(block_tables)
    max_query_len = max(query_lens)
    max_context = max(context_lens)
    num_ctx_blocks = -(-max_context // block_size)
    tables = torch.zeros(num_seqs, num_ctx_blocks, dtype=torch.int64)
    for b, table in enumerate(block_tables):
        used = table[:-(-context_lens[b] // block_size)]
        tables[b, :len(used)] = torch.tensor(used, dtype=torch.int64)
    key_pos = torch.arange(max_context)
    kv_gather = tables.repeat_interleave(block_size, dim=1)[:, :max_context] * block_size + key_pos % block_size
    ctx = torch.tensor(context_lens, dtype=torch.int64)
    qlen = torch.tensor(query_lens, dtype=torch.int64)
    kv_gather = torch.where(key_pos[None, :] < ctx[:, None], kv_gather, torch.zeros_like(kv_gather))

    token_seq = torch.arange(num_seqs).repeat_interleave(qlen)
    starts = torch.cumsum(qlen, 0) - qlen
    token_offset = torch.arange(int(qlen.sum())) - starts.repeat_interleave(qlen)
    token_pos = (ctx - qlen).repeat_interleave(qlen) + token_offset
    slot_mapping = kv_gather[token_seq, token_pos]

    # Query positions in the padded [B, Lq] layout; padded rows get position 0 (they see key 0 only).
    q_pos = torch.zeros(num_seqs, max_query_len, dtype=torch.int64)
    q_pos[token_seq, token_offset] = token_pos
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    non_blocking = device.type == "cuda"
    to = (lambda t: t.pin_memory().to(device, non_blocking=True)) if non_blocking else (lambda t: t.to(device))
    return AttentionMeta(
        positions=to(token_pos), slot_mapping=to(slot_mapping), kv_gather=to(kv_gather), mask=to(mask[:, None]),
        token_seq=to(token_seq), token_offset=to(token_offset), num_seqs=num_seqs,
        max_query_len=max_query_len, decode_only=max_query_len == 1 and int(qlen.sum()) == num_seqs)


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
        queries = q.view(meta.num_seqs, 1, num_heads, head_dim)
    else:
        queries = q.new_zeros(meta.num_seqs, meta.max_query_len, num_heads, head_dim)
        queries[meta.token_seq, meta.token_offset] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask,
        scale=scale, enable_gqa=num_heads != kv_heads)
    out = out.transpose(1, 2)  # [B, Lq, heads, d]
    if meta.decode_only:
        return out.reshape(num_tokens, num_heads, head_dim)
    return out[meta.token_seq, meta.token_offset]
