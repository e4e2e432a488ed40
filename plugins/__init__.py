"""Built-in plugins: loaders, capture, losses, optimizers, exporters and the report.

Each module here that implements hooks is registered through the `compressor.plugins`
entry-point group in pyproject.toml, the same way a third-party plugin is; the others are
helpers (hf.py, text_corpora.py, moe_block.py, head_taps.py). Passes may import these
modules; these never import a pass.
"""
