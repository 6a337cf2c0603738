"""The release number, in one place: ``pyproject.toml`` reads it at build time, ``xpoptim.__version__`` imports it."""

__version__ = "0.2.0"
