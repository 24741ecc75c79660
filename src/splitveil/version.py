"""The package version, importable without the package's lazy ``__init__`` API."""
__version__ = "0.1.0"
