"""Data: read the user's files in any supported format, tokenize them once, cache the result for the workers."""
