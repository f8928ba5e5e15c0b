"""How many device adapter slots `--max-loras auto` gives: what fits the GPU memory left, with a margin."""
from __future__ import annotations

import logging

from ..errors import ResourceExhausted

log = logging.getLogger(__name__)

CPU_SLOTS = 8
"""On the CPU memory is not what bounds slots (step time is): auto keeps the fixed default."""


def slots_that_fit(free_bytes: int, bytes_per_slot: int, margin_bytes: int, fewest: int, most: int) -> int:
    """floor((free - margin) / bytes_per_slot), at most `most`; ResourceExhausted below `fewest` (the most
    adapters one request may mix: fewer slots could never serve it)."""
    assert bytes_per_slot > 0 and 1 <= fewest <= most
    fit = max(0, free_bytes - margin_bytes) // bytes_per_slot
    if fit < fewest:
        raise ResourceExhausted(
            f"--max-loras auto: {free_bytes} bytes of GPU memory are free after the model and KV cache; with "
            f"{margin_bytes} kept free, {fit} slots of {bytes_per_slot} bytes fit, fewer than the "
            f"{fewest} one request may mix; lower the KV cache's memory fraction or --max-lora-rank")
    return int(min(fit, most))


def log_auto_slots(num_slots: int, free_bytes: int, bytes_per_slot: int, margin_bytes: int, most: int) -> None:
    log.info("--max-loras auto: %d adapter slots of %.1f MiB (%.2f GiB free after the model and KV cache, "
             "%.2f GiB kept free, at most %d)", num_slots, bytes_per_slot / 2**20, free_bytes / 2**30,
             margin_bytes / 2**30, most)
