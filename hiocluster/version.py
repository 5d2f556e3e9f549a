"""hiocluster's version (a module of its own: the protocol layer reads it without
importing the package's API)."""

__version__ = "0.1.0"
