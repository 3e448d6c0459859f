"""cntk_engine: exact Convolutional Neural Tangent Kernels (CNTK) and NNGP kernels.

``gram`` computes kernel matrices between batches of images (Arora et al. 2019,
arXiv 1904.11955); see ``cntk_engine.arch`` for the math.
"""
from .api import gram
from .arch import Architecture
from .backends import available_backends

__version__ = "0.1.0"
__all__ = ["gram", "Architecture", "available_backends", "__version__"]
