"""Postproc service: token statistics, sampling and embeddings on the GPU (CuPy) with a NumPy fallback."""
