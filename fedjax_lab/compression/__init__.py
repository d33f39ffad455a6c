"""Compression toolkit: count sketch, sparsifiers and quantizers (pure, jittable, vmappable).

Every compressor works on flat vectors (`fedjax_lab.core.tree.flatten` ravels a params pytree)
and comes with the exact size of its message on the wire (`*_bytes`).
"""
from fedjax_lab.compression.quantize import (Quantized, Signed, qsgd, qsgd_bytes, qsgd_decode,
                                             scaled_sign, scaled_sign_bytes, scaled_sign_decode)
from fedjax_lab.compression.sketch import (CountSketch, count_sketch, hashes, heavy_hitters, query,
                                           sketch, sketch_clients, sketch_sparse, unsketch)
from fedjax_lab.compression.sparsify import (Sparse, random_k, random_k_bytes, sparse_bytes,
                                             to_dense, top_k, with_error_feedback)

__all__ = ["CountSketch", "count_sketch", "hashes", "sketch", "sketch_clients", "sketch_sparse",
           "query", "unsketch", "heavy_hitters", "Sparse", "top_k", "random_k", "to_dense",
           "with_error_feedback", "sparse_bytes", "random_k_bytes", "Quantized", "qsgd",
           "qsgd_decode", "qsgd_bytes", "Signed", "scaled_sign", "scaled_sign_decode",
           "scaled_sign_bytes"]
