"""Benchmarks: baselines that `loraplex bench` compares the engine against."""
