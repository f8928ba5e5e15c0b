"""Paged attention in plain PyTorch: the CPU backend and the oracle of the Triton kernels (same signatures).

    for each sequence b, for each of its query rows t (position q_pos), for each query head h:
        g = h // (Hq // Hkv)                                   # GQA: the KV head of h
        keys j: j <= q_pos and (window is None or j > q_pos - window)   # causal, sliding window
        K[j] = k_cache[block_tables[b, j // bs], j % bs, g]    # likewise V
        out[t, h] = sum_j softmax_j(scale * q[t, h] . K[j]) V[j]      # scores/softmax in fp32 (fp64 for fp64)

q: [T, Hq, D]; k_cache, v_cache: [num_blocks, bs, Hkv, D]; out: [T, Hq, D] in q's dtype. Only positions
< seq_lens[b] of the first cdiv(seq_lens[b], bs) blocks of row b are read; unused blocks, the unused tail
of a block and the rest of the row may hold anything (NaN included). Every row of q must belong to a
sequence (query_start[B] == T).
"""
from __future__ import annotations

import torch

from .meta import AttentionStepMeta


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_index: torch.Tensor) -> None:
    """k_cache.view(-1, Hkv, D)[kv_index[t]] = k[t] (likewise v); k, v: [T, Hkv, D]; caches mutated."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, kv_index, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, kv_index, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionStepMeta,
                    scale: float, sliding_window: int | None = None, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring (written into `out` when given). One pass per sequence, reading its meta on
    the host: free on CPU, a sync on CUDA, where this is only the oracle."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % kv_heads == 0 and k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    group = num_heads // kv_heads
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    query_start = meta.query_start.tolist()
    seq_lens = meta.seq_lens.tolist()
    assert len(query_start) == meta.num_seqs + 1 and query_start[-1] == num_tokens
    out = torch.empty_like(q) if out is None else out
    for b in range(meta.num_seqs):
        start, end, seq_len = query_start[b], query_start[b + 1], seq_lens[b]
        q_len = end - start
        if q_len == 0:
            continue
        first_key = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1)
        first_block = first_key // block_size
        blocks = meta.block_tables[b, first_block:-(-seq_len // block_size)].long()
        lo, hi = first_key - first_block * block_size, seq_len - first_block * block_size
        keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[lo:hi].to(compute)  # [L, Hkv, D]
        values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[lo:hi].to(compute)
        queries = q[start:end].to(compute).view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(queries, keys.permute(1, 2, 0)[:, None]) * scale  # [Hkv, G, q_len, L]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(first_key, seq_len, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        attended = torch.matmul(probs, values.permute(1, 0, 2)[:, None])  # [Hkv, G, q_len, D]
        out[start:end] = attended.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out
