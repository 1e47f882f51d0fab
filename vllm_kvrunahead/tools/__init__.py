"""The tuner, the demo and its models, the reference implementation."""
