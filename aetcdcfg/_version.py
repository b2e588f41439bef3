"""The package's version, in one place: hatchling reads it for the build, ``aetcdcfg.__version__`` and
``aetcdcfg --version`` import it."""

__version__ = "0.1.0"
