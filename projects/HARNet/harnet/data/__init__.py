"""Built-in datasets and dataset registration helpers."""
