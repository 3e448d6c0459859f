"""``python -m bench ...``: the benchmark harness (see bench/harness.py and bench/README.md)."""
from .harness import main

main()
