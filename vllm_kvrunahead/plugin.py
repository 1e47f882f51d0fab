"""vLLM general-plugin entry point (setup.cfg: vllm.general_plugins)."""
from __future__ import annotations

_registered = False


def register() -> list[str]:
    """Apply KV-Runahead's patches. Idempotent: vLLM loads plugins in every process,
    possibly more than once. Fails loudly: an exception here stops vLLM's start."""
    global _registered
    from .config import check_vllm_version
    from .vllm_side.patches import apply_all

    if not _registered:
        check_vllm_version()
    applied = apply_all()
    _registered = True
    return applied


def is_registered() -> bool:
    return _registered
