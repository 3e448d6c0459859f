"""``python -m cntk_engine``: the ``cntk-engine`` command line (see ``cntk_engine.cli``)."""
import sys

from .cli import main

sys.exit(main())
