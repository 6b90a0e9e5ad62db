"""Data: sources, tokenizers, preprocessing into memory-mapped arrays, and batching."""
