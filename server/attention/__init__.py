"""Paged attention: per-step metadata (`meta`), the PyTorch twin (`reference`), Triton kernels
(`triton_paged`) and the dispatch the model calls (`ops`)."""
