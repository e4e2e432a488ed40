"""Built-in plugins: loaders, capture, losses, optimizers, exporters and the report.

Each module here is registered through the `compressor.plugins` entry-point group in
pyproject.toml, the same way a third-party plugin is.
"""
