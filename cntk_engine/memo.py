"""Results of per-image-set work kept for a set met again, within a bound of bytes.

A training set is met again and again: ``gram(x_batch, x_train)`` called batch after batch, an
estimator's ``predict`` at every call.  Its per-image work on the host (the diagonal recursion
of the magnitude checks, a pooled stack's diagonals) costs far more than hashing its pixels, so
the results of the sets seen last are kept (``inputs.known_diagonal_extremes``,
``diag.diag_norms``), keyed by :func:`images_key`: an array changed in place is a new set.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def images_key(x: np.ndarray, *context) -> tuple:
    """The key of host images ``x`` (C-contiguous) and what else the result depends on: the
    SHA-256 of their bytes, their shape and dtype, then ``context`` (hashable)."""
    return (hashlib.sha256(x.data).hexdigest(), x.shape, x.dtype.str) + context


#: What an entry costs beyond its arrays' bytes (its key, tuple and dict slot: some 700 bytes
#: measured for a one-image entry), counted against the bound so that many small entries do
#: not hold far more than it.
ENTRY_BYTES = 1024


class Memo:
    """Values by key, the least recently used dropped first while the kept ones' bytes (their
    arrays' and :data:`ENTRY_BYTES` each) exceed the bound given to :meth:`put`; thread-safe.
    A value is kept as given: the caller shares it read-only or hands out copies."""

    def __init__(self):
        self._kept: OrderedDict = OrderedDict()        # key -> (value, bytes counted)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        """The value kept for ``key`` (now the most recently used), or None."""
        with self._lock:
            hit = self._kept.get(key)
            if hit is None:
                return None
            self._kept.move_to_end(key)
            return hit[0]

    def put(self, key, value, nbytes: int, bound: int) -> bool:
        """Keep ``value`` (``nbytes`` bytes of arrays) unless it alone exceeds ``bound``; drop
        the least recently used others until the kept bytes are within ``bound``.  Whether it
        was kept."""
        size = nbytes + ENTRY_BYTES
        if size > bound:
            return False
        with self._lock:
            old = self._kept.pop(key, None)          # two callers that missed the same key
            if old is not None:
                self._bytes -= old[1]
            self._kept[key] = (value, size)
            self._bytes += size
            while self._bytes > bound:
                _, (_, dropped) = self._kept.popitem(last=False)   # never this one: the newest
                self._bytes -= dropped
        return True

    def values(self) -> list:
        with self._lock:
            return [v for v, _ in self._kept.values()]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)
