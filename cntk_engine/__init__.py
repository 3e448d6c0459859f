"""cntk_engine: exact Convolutional Neural Tangent Kernels (CNTK) and NNGP kernels.

``gram`` computes kernel matrices between batches of images (Arora et al. 2019,
arXiv 1904.11955); see ``cntk_engine.arch`` for the math.  ``solver`` solves kernel
regression on them; ``CNTKClassifier`` / ``CNTKRegressor`` are scikit-learn estimators
(imported on first use: scikit-learn is an optional dependency, ``pip install ".[sklearn]"``).
"""
from . import solver
from .api import clear_memos, gram
from .arch import Architecture, AvgPool, ConvRelu, serial
from .backends import available_backends
from .version import __version__
__all__ = ["gram", "Architecture", "ConvRelu", "AvgPool", "serial", "available_backends", "solver", "clear_memos", "CNTKClassifier",
           "CNTKRegressor", "__version__"]


def __getattr__(name):
    if name in ("CNTKClassifier", "CNTKRegressor"):
        from . import estimators
        return getattr(estimators, name)
    raise AttributeError(f"module 'cntk_engine' has no attribute {name!r}")
