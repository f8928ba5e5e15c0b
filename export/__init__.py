"""loraplex export: merges, ONNX, TensorRT."""
