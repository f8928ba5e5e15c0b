"""NF4 (bitsandbytes, double-quantized) weights and their kernels: `NF4Weight`, and `ops` for the model."""
from .format import NF4Weight
from .ops import dequantize, linear, linear_gate_up_silu

__all__ = ["NF4Weight", "dequantize", "linear", "linear_gate_up_silu"]
