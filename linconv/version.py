"""linconv's version, in a module of its own so that the package's modules can read it without ``import linconv``."""

__version__ = "0.1.0"
