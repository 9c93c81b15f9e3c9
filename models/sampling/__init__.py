"""Sampling: the KV-cache sampling loop and device RNG (generate), speculative Jacobi decoding (speculative)."""
