"""Torch only: the point-to-point flows and the chain's per-layer moves."""
