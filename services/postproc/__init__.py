"""Postproc service: token statistics on the GPU (CuPy) with a NumPy fallback."""
