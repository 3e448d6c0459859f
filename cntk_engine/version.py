"""The package version (one place: the store records it in every job)."""
__version__ = "0.1.0"
