"""Causal-LM cross-entropy from the final hidden states, only where labels are trained, in chunks.

The default loss builds logits for every position ([batch, seq, vocab], then an fp32 copy and its
gradient: for a 128k vocabulary and 4 x 1024 tokens, ~6 GB). Here the model runs with
`logits_to_keep=1`, a forward hook keeps the output of its final norm, and the loss is

    sum over trained positions t of CE(lm_head(h[t]), labels[t + 1])  /  num_items_in_batch

computed `chunk_tokens` positions at a time, each chunk under activation checkpointing so its logits
are rebuilt in backward instead of kept. Prompt positions never reach lm_head. The value equals
transformers' ForCausalLMLoss (tests/training/test_loss.py). With `fused=True` (Liger Kernel, GPU) the
same sum is one fused linear + cross-entropy over all trained positions instead (training/kernels.py).
Llama-family heads only (no logit
scaling or soft-capping); not with FSDP, whose sharded lm_head weight is not readable outside forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .encode import IGNORE

CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports_chunked_loss(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    return (base.config.model_type in CHUNKED_MODEL_TYPES and hasattr(decoder, "norm")
            and base.get_output_embeddings() is not None and not getattr(base.config, "final_logit_softcapping", None))


class ChunkedCausalLMLoss:
    """A Trainer `compute_loss_func`: (outputs, labels, num_items_in_batch) -> loss."""

    def __init__(self, model, chunk_tokens: int = 1024, fused: bool = False):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lm_head = base.get_output_embeddings()
        self.chunk_tokens, self.fused = chunk_tokens, fused
        self._hidden: torch.Tensor | None = None
        self._hook = base.model.norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._hidden = output  # [B, T, H]

    def close(self) -> None:
        self._hook.remove()

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        assert hidden is not None, "the model ran without its final norm (forward hook not called)"
        targets = labels[:, 1:].to(hidden.device)      # [B, T-1]: position t predicts token t+1
        where = targets != IGNORE
        h = hidden[:, :-1][where]                        # [N, H]
        y = targets[where]                               # [N]
        weight = self.lm_head.weight
        total = hidden.new_zeros((), dtype=torch.float32)
        if self.fused and y.numel():
            from .kernels import fused_linear_cross_entropy_sum

            total = total + fused_linear_cross_entropy_sum(h, y, weight).float()
        for start in range(0, 0 if self.fused else y.numel(), self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            if torch.is_grad_enabled():
                total = total + checkpoint(_ce_sum, h[chunk], y[chunk], weight, use_reentrant=False)
            else:
                total = total + _ce_sum(h[chunk], y[chunk], weight)
        if y.numel() == 0:
            total = total + hidden.sum() * 0.0  # keep the graph connected (DDP needs every step to backward)
        denominator = num_items_in_batch if num_items_in_batch is not None else max(1, y.numel())
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return total / denominator


def _ce_sum(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight.to(h.dtype)).float()   # [n, V]
    return F.cross_entropy(logits, y, reduction="sum")
