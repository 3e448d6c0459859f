"""Import neural-tangents 0.6.5 (its latest release) under a current JAX, for comparisons only.

neural-tangents 0.6.5 was released against JAX 0.4.x. Under JAX >= 0.7 (the GPU machines here
have 0.11.2) ``import neural_tangents`` fails before any kernel is built, for three reasons that
do not touch the infinite-width kernels of ``stax`` (``neural_tangents/_src/stax``):

1. ``neural_tangents/__init__.py`` imports ``experimental.empirical_tf``, which imports
   ``jax.experimental.jax2tf`` and so TensorFlow (a ~600 MB wheel, and not a need of ``stax``).
   We register an empty ``neural_tangents.experimental`` module when TensorFlow is missing.
2. ``_src/empirical.py`` imports ``Jaxpr``, ``JaxprEqn``, ``Literal``, ``Var``, ``Primitive`` from
   ``jax.core`` and ``safe_map``/``safe_zip`` from ``jax.util``: JAX moved them to
   ``jax.extend.core`` and ``jax._src.util``. We alias the same objects back.
3. ``_src/utils/rules.py`` uses ``jax.interpreters.ad.zeros_like_p`` as a dictionary key of its
   structure rules for empirical kernels (removed in JAX 0.7). We give it a fresh primitive that
   never appears in any trace, so the rule is simply never matched.

Nothing here changes a computation: the aliases are the objects JAX itself uses, and only the
empirical-kernel code (not used by our benchmarks or fixtures) refers to them. That the result is
still neural-tangents' exact kernel is checked, not assumed:
``python tests/fixtures/make_nt_fixtures.py --check`` recomputes every stored neural-tangents
value (made with JAX 0.4.26 and no shim) and compares.

Usage: ``import nt_compat; nt_compat.install()`` before ``import neural_tangents``; it does
nothing where neural-tangents imports on its own.
"""
from __future__ import annotations

import importlib.util
import sys
import types

PATCHED: list[str] = []    # what install() changed, for the record of a benchmark run


def _module_imports(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable as is"
        return False


def install() -> list[str]:
    """Make ``import neural_tangents`` work under the installed JAX; returns what was patched."""
    if "neural_tangents" in sys.modules:
        return PATCHED
    if importlib.util.find_spec("neural_tangents") is None:
        raise ImportError("neural_tangents is not installed (pip install neural-tangents==0.6.5 "
                          "frozendict, or carry their wheels: tools/gpu/README.md)")
    import jax
    import jax.core
    import jax.interpreters.ad as ad

    if importlib.util.find_spec("tensorflow") is None:
        sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
        PATCHED.append("neural_tangents.experimental (needs TensorFlow): empty module")
    moved = ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive")
    if not all(hasattr(jax.core, n) for n in moved):
        import jax.extend.core as extend_core
        for n in moved:
            if not hasattr(jax.core, n):
                setattr(jax.core, n, getattr(extend_core, n))
                PATCHED.append(f"jax.core.{n} = jax.extend.core.{n}")
    if not _module_imports("jax.util"):
        import jax._src.util as src_util
        util = types.ModuleType("jax.util")
        util.safe_map, util.safe_zip = src_util.safe_map, src_util.safe_zip
        sys.modules["jax.util"] = util
        PATCHED.append("jax.util.safe_map/safe_zip = jax._src.util's")
    if not hasattr(ad, "zeros_like_p"):
        import jax.extend.core as extend_core
        ad.zeros_like_p = extend_core.Primitive("zeros_like_unused")
        PATCHED.append("jax.interpreters.ad.zeros_like_p: unused placeholder primitive")
    del jax
    return PATCHED
