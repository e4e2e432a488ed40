"""Built-in graph passes, one per module, each registered as a plugin."""
