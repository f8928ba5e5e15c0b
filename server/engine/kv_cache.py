"""KV cache storage: per layer, K and V as [num_blocks, block_size, kv_heads, head_dim]."""
from __future__ import annotations

import torch

from ..model.arch import ModelArch


def kv_bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * element


def allocate_kv_cache(arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-filled, so that padded reads of the reserved block 0 are finite."""
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(arch.num_layers)]
