"""Data: the synthetic visual-QA generator, loaders for common formats, and encoding."""
