"""What a plugin cannot do through vLLM's public seams, patched in one place.

Each patch is registered with the vLLM symbol it touches, why, how, its
upstream status and when to remove it; ``register()`` applies them all, once.
``python -m vllm_kvrunahead.patches`` prints this registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Patch:
    name: str
    symbol: str
    why: str
    how: str
    upstream: str
    remove_when: str
    apply: Callable[[], None]


def _registry() -> tuple[Patch, ...]:
    from . import config_hook, executor_sizes

    return (config_hook.PATCH, executor_sizes.PATCH)


_applied: set[str] = set()


def apply_all() -> list[str]:
    """Apply every registered patch once per process (vLLM loads plugins repeatedly)."""
    for p in _registry():
        if p.name not in _applied:
            p.apply()
            _applied.add(p.name)
    return sorted(_applied)


def describe() -> str:
    rows = []
    for p in _registry():
        rows.append(f"{p.name}\n  symbol: {p.symbol}\n  why: {p.why}\n  how: {p.how}\n"
                    f"  upstream: {p.upstream}\n  remove when: {p.remove_when}")
    return "\n\n".join(rows)


if __name__ == "__main__":
    print(describe())
