"""huatuo-local's version, importable from every layer (the package root is the top layer: it is imported by
nothing inside the package). Keep in step with pyproject.toml."""

__version__ = "0.1.0"
