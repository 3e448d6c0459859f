"""The package version (one place: the store records it in every job), and how an optional
extra is installed (one place: every message that names one)."""
__version__ = "0.1.0"


def install_hint(extra: str) -> str:
    """How to add the optional dependencies ``extra``: the README's Install form, ``pip install
    ".[extra]"`` in the source folder (the package is installed from source, not from PyPI)."""
    return f'pip install ".[{extra}]" in the cntk_engine source folder'
