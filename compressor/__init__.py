"""compressor: a plugin-based model-compression compiler for knowledge distillation."""

from compressor.markers import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
