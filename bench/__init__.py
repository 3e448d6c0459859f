"""Benchmarks and reproduction scripts of cntk_engine (``python -m bench --help``).

A package only so that ``python -m bench`` and ``python -m bench.reproduce_table1`` work from
the repository root; every script also runs as ``python bench/<script>.py``.
"""
