"""Batch buckets: the padded batch sizes decode steps run at (one CUDA graph per bucket).

Kernels that choose a launch shape from the batch size (e.g. split-KV attention) choose it from the
bucket, so a decode step computes the same bits whether it runs eagerly or as a padded graph.
"""
from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def batch_bucket(num_seqs: int, max_batch: int | None = None) -> int:
    """The smallest bucket holding `num_seqs` (capped buckets end at max_batch; past 256: num_seqs itself)."""
    buckets = BATCH_BUCKETS if max_batch is None else tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
    return next((b for b in buckets if b >= num_seqs), num_seqs)
