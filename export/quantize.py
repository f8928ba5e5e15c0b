"""`--quantize nf4`: re-quantize a merged checkpoint to bitsandbytes NF4, on purpose and with its error measured.

A merge happens in full precision; re-quantizing it adds error on top of the adapters' deltas, so this
step only runs when asked and reports what it cost: the relative Frobenius error of every quantized
weight and the change in logits on a fixed probe. The output is what transformers writes for a model
loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quantization), i.e. what the server's NF4
base holds (blocksize 64).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .hf import DTYPES

log = logging.getLogger(__name__)
PROBE_TOKENS = 32


@dataclass(frozen=True, slots=True)
class QuantizationReport:
    method: str
    num_weights: int
    max_rel_error: float
    """max over quantized weights of ||W - dequant(nf4(W))||_F / ||W||_F."""
    mean_rel_error: float
    probe_logits_max_abs_diff: float
    """Over PROBE_TOKENS fixed tokens: max |logits(full precision) - logits(nf4)|."""
    probe_greedy_agreement: float
    """Fraction of probe positions whose argmax token is unchanged."""

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_nf4(full_precision: Path, out: Path, dtype: str) -> QuantizationReport:
    """Load `full_precision` (an HF folder) quantized to NF4 on the CPU, save it to `out`, report the error."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = DTYPES[dtype]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    reference = AutoModelForCausalLM.from_pretrained(str(full_precision), dtype=compute, device_map="cpu").eval()
    quantized = AutoModelForCausalLM.from_pretrained(str(full_precision), quantization_config=config,
                                                     dtype=compute, device_map="cpu").eval()
    errors = []
    reference_modules = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            original = reference_modules[name].weight.detach().float()
            restored = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            norm = torch.linalg.vector_norm(original)
            errors.append(float(torch.linalg.vector_norm(original - restored) / norm) if norm > 0 else 0.0)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, quantized.config.vocab_size, (1, PROBE_TOKENS), generator=generator)
    with torch.no_grad():
        full = reference(probe).logits.float()
        four = quantized(probe).logits.float()
    quantized.save_pretrained(str(out))
    report = QuantizationReport(
        method="bitsandbytes nf4, double quantization, blocksize 64", num_weights=len(errors),
        max_rel_error=max(errors), mean_rel_error=sum(errors) / len(errors),
        probe_logits_max_abs_diff=float((full - four).abs().max()),
        probe_greedy_agreement=float((full.argmax(-1) == four.argmax(-1)).float().mean()))
    log.warning("re-quantized to NF4 on request: weight rel. error max %.4f mean %.4f, probe logits max diff %.4f",
                report.max_rel_error, report.mean_rel_error, report.probe_logits_max_abs_diff)
    return report
