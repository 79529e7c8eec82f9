"""Quantization primitives for KV-cache compression.

* :mod:`.packing` -- dense bit packing of 1..8-bit codes.
* :mod:`.uniform` -- asymmetric min/max (KIVI-style) uniform quantization.
* :mod:`.codebook` -- non-uniform codebook (KVQuant "nuq") quantization.
* :mod:`.outliers` -- dense-and-sparse outlier isolation.
"""

from .codebook import (
    CodebookQuantized,
    dequantize_codebook,
    fit_codebook,
    normalize_minmax,
    quantize_codebook,
    quantize_with_codebook,
)
from .outliers import SparseOutliers, outlier_thresholds, split_outliers
from .packing import pack_bits, packed_nbytes, unpack_bits, validate_bits
from .uniform import UniformQuantized, quantize_uniform

__all__ = [
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "validate_bits",
    "UniformQuantized",
    "quantize_uniform",
    "fit_codebook",
    "quantize_codebook",
    "dequantize_codebook",
    "normalize_minmax",
    "CodebookQuantized",
    "quantize_with_codebook",
    "SparseOutliers",
    "split_outliers",
    "outlier_thresholds",
]
