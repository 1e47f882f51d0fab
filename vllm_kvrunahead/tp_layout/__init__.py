"""The TP layout (--tensor-parallel-size N)."""
