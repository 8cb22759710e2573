"""edge-inspect: learn good parts from good images, flag and localise anything else on the line."""

__version__ = "0.1.0"
