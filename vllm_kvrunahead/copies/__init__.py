"""The chain of copies (--prefill-context-parallel-size N)."""
