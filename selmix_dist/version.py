"""The package version, in a module of its own so that modules can read it without importing the package's
`__init__` (whose lazy `load_classifier` imports classifier.py, which records this version in an export)."""

__version__ = "0.1.0"
