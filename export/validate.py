"""Check an ONNX export against PyTorch with onnxruntime: first-step logits within a printed tolerance, and
greedy tokens through onnxruntime's KV-cache loop identical to PyTorch's.

The PyTorch side recomputes the whole sequence at every step (no cache), so a mistake in the exported
cache handling cannot hide behind the same mistake on both sides. An int4 export is compared with the
same decoder running the 4-bit weights read back from the ONNX file (exact reference for the graph),
and its distance to the full-precision model is reported beside it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .decoder import ExportDecoder
from .runtime import OnnxDecoder, greedy_kv, left_pad

TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 2e-2), "int4": (1e-3, 1e-3)}
"""kind -> (atol, rtol): logits pass when max |ort - torch| <= atol + rtol * max |torch| (over real tokens)."""
DEFAULT_PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea, there lived")


@dataclass(slots=True)
class ValidationReport:
    kind: str
    """fp32, fp16, bf16 or int4."""
    reference: str
    runnable: bool
    """False when onnxruntime's CPU provider cannot run this dtype (then nothing below was measured)."""
    reason: str = ""
    prompt_lengths: list[int] = field(default_factory=list)
    logits_max_abs_diff: float = float("nan")
    logits_max_abs: float = float("nan")
    tolerance: float = float("nan")
    greedy_tokens: int = 0
    ort_tokens: list[list[int]] = field(default_factory=list)
    torch_tokens: list[list[int]] = field(default_factory=list)
    greedy_equal: bool = False
    passed: bool = False
    seconds: float = 0.0
    versus_full_precision: dict | None = None
    """int4 only: logits distance and greedy agreement with the unquantized model (informative, no pass/fail)."""
    ort_logits: object = field(default=None, repr=False)
    """First-step logits from onnxruntime (not serialized)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "ort_logits"}

    def summary(self) -> str:
        if not self.runnable:
            return f"{self.kind}: exported, not run ({self.reason})"
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{self.kind} vs {self.reference}: logits max |diff| {self.logits_max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}, max |logit| {self.logits_max_abs:.3g}); greedy "
                f"{self.greedy_tokens} tokens x {len(self.ort_tokens)} prompts "
                f"{'identical' if self.greedy_equal else 'DIFFERENT'}: {verdict}")


def torch_step(decoder: ExportDecoder):
    """A runtime.StepFn running the PyTorch decoder (past stays torch tensors)."""

    def step(ids, mask, positions, past):
        with torch.no_grad():
            logits, *present = decoder(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positions),
                                       *past)
        return logits.numpy(), present

    return step


def torch_greedy_recompute(decoder: ExportDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Greedy tokens recomputing every prefix from scratch (empty cache), and the first step's logits."""
    step = torch_step(decoder)
    sequences = [list(p) for p in prompts]
    first = None
    for _ in range(max_new_tokens):
        ids, mask, positions = left_pad(sequences)
        logits, _ = step(ids, mask, positions, decoder.empty_past(len(sequences)))
        first = logits if first is None else first
        for row, token in enumerate(logits[:, -1].argmax(-1).tolist()):
            sequences[row].append(token)
    return [s[len(p):] for s, p in zip(sequences, prompts)], first


def validation_prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    """Two prompts of different lengths (a padded batch): the tokenizer's, else seeded random ids."""
    if tokenizer is not None:
        return [tokenizer(p).input_ids for p in DEFAULT_PROMPTS]
    generator = np.random.default_rng(0)
    return [generator.integers(0, vocab_size, n).tolist() for n in (5, 9)]


def compare(kind: str, reference: str, onnx_path: Path, decoder: ExportDecoder, prompts: list[list[int]],
            max_new_tokens: int, torch_result=None) -> ValidationReport:
    """Run both sides; torch_result (tokens, first logits) may be passed in when already computed."""
    started = time.perf_counter()
    report = ValidationReport(kind=kind, reference=reference, runnable=True, greedy_tokens=max_new_tokens,
                              prompt_lengths=[len(p) for p in prompts])
    try:
        session = OnnxDecoder(onnx_path)
        ort_tokens, ort_logits = greedy_kv(session.step, session.empty_past, prompts, max_new_tokens)
    except Exception as exc:  # onnxruntime raises its own types (NOT_IMPLEMENTED for missing CPU kernels)
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        report.runnable = False
        report.reason = "onnxruntime's CPU provider has no kernel for it: " + str(exc).split(":")[-1].strip()
        report.seconds = time.perf_counter() - started
        return report
    torch_tokens, torch_logits = torch_result or torch_greedy_recompute(decoder, prompts, max_new_tokens)
    real = left_pad(prompts)[1].astype(bool)  # compare real tokens only: padded rows are masked garbage
    diff = float(np.abs(ort_logits[real] - torch_logits[real]).max())
    scale = float(np.abs(torch_logits[real]).max())
    atol, rtol = TOLERANCES[kind]
    report.logits_max_abs_diff, report.logits_max_abs, report.tolerance = diff, scale, atol + rtol * scale
    report.ort_tokens, report.torch_tokens, report.ort_logits = ort_tokens, torch_tokens, ort_logits
    report.greedy_equal = ort_tokens == torch_tokens
    report.passed = bool(report.greedy_equal and diff <= report.tolerance and np.isfinite(ort_logits[real]).all())
    report.seconds = time.perf_counter() - started
    return report


def int4_weights(model) -> dict[str, np.ndarray]:
    """{decoder parameter name: dequantized [K, N] fp32} for every MatMulNBits node of an ONNX ModelProto."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not node.input[1].endswith("_Q4"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        assert bits == 4, "only 4-bit weights are produced here"
        packed = numpy_helper.to_array(initializers[node.input[1]])  # [N, blocks, block / 2] uint8
        blocks = packed.shape[1]
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
        scales = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32).reshape(n, blocks)
        zero = np.float32(8.0)
        if len(node.input) > 3 and node.input[3]:
            zp = numpy_helper.to_array(initializers[node.input[3]])
            zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)[..., None]
        dequantized = ((values - zero) * scales[..., None]).reshape(n, blocks * block)[:, :k]
        weights[node.input[1][: -len("_Q4")]] = dequantized.T.copy()
    return weights


def load_int4_weights(decoder: ExportDecoder, weights: dict[str, np.ndarray]) -> int:
    """Overwrite the decoder's transposed weights with the 4-bit ones; returns how many were replaced."""
    params = dict(decoder.named_parameters())
    for name, value in weights.items():
        params[name].data.copy_(torch.from_numpy(value).to(params[name].dtype))
    return len(weights)
