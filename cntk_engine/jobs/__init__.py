"""Gram jobs: the job record, its tiles, where they run, and where their results go.

* :mod:`.job`: :class:`GramJob`, the record ``gram`` builds once, and :func:`run_job`.
* :mod:`.tiles`: how the matrix is cut into tiles and how large a tile is.
* :mod:`.local`: worker threads on this machine (one per GPU, or the calling thread on the CPU).
* :mod:`.sinks`: finished tiles into memory (host or GPU).
* :mod:`.store`: the resumable Zarr store (the only module that knows its format) and
  :func:`~.store.load_gram`.
* :mod:`.dask`: tiles as Dask tasks (imported only when a client is given).
"""
from .job import GramJob, run_job

__all__ = ["GramJob", "run_job"]
