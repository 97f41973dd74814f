"""linconv's version, in a module of its own so that the package's modules can read it without
importing ``linconv`` itself (keep it equal to ``version`` in pyproject.toml)."""

__version__ = "0.1.0"
