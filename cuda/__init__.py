"""Distillation loss kernels (`compressor.cuda.kernels`), by implementation name.

This file imports nothing on purpose: run from the repository root, this folder is also
visible as a top-level `cuda` package, and torch probes `cuda.bindings` at import time. An
import-free package makes that probe fail cleanly with ImportError instead of re-entering
torch while it initialises.
"""
