"""Every use of vLLM internals: the seam, the guest runner, metrics, patches."""
