"""The package's layout keeps its rules (README, Code map): every module imports, the pure core imports only
itself, ``config`` and ``log`` (no torch, no vLLM), the transport no vLLM, only the vLLM side (and the tools,
which start engines) vLLM, and the two modes meet only in ``runahead.py`` and ``modes.py``. Read from each
module's imports (fast: no engine)."""
import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import vllm_kvrunahead

PKG = Path(vllm_kvrunahead.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(PKG)], "vllm_kvrunahead.")
                 if not m.name.endswith("__main__"))


def imports_of(module: str) -> set[str]:
    """Absolute names of what ``module`` imports (relative imports resolved), anywhere in its code."""
    path = PKG.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                out |= {f"{target}.{a.name}" for a in node.names} if not node.module else {target}
            else:
                out.add(node.module)
    return out


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_layout_rules_hold():
    assert len(MODULES) > 30
    for m in MODULES:
        deps = imports_of(m)
        ours = {d for d in deps if under(d, "vllm_kvrunahead")}
        if under(m, "vllm_kvrunahead.core"):
            assert not {d for d in deps if under(d, "torch", "vllm")}, m
            assert all(under(d, "vllm_kvrunahead.core", "vllm_kvrunahead.config", "vllm_kvrunahead.log")
                       for d in ours), (m, ours)
        if under(m, "vllm_kvrunahead.transport"):
            assert not {d for d in deps if under(d, "vllm", "vllm_kvrunahead.vllm_side")}, m
        if not under(m, "vllm_kvrunahead.vllm_side", "vllm_kvrunahead.tools", "vllm_kvrunahead.config"):
            assert not {d for d in deps if under(d, "vllm")}, (m, "imports vLLM outside vllm_side/")
        if under(m, "vllm_kvrunahead.copies"):
            assert not {d for d in ours if under(d, "vllm_kvrunahead.tp_layout")}, m
        if under(m, "vllm_kvrunahead.tp_layout"):
            assert not {d for d in ours if under(d, "vllm_kvrunahead.copies")}, m


def test_what_benchmarks_and_tests_import_of_the_package_exists():
    """Scripts import the package inside functions too (GPU-only paths no CPU test runs): every such name must
    still resolve after a move, a module or a name in it."""
    root = PKG.parent
    missing = []
    for path in sorted([*root.glob("benchmarks/*.py"), *root.glob("tests/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and under(node.module or "", "vllm_kvrunahead"):
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    missing.append(f"{path.name}:{node.lineno}: {node.module} ({e})")
                    continue
                missing += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if under(a.name, "vllm_kvrunahead") and importlib.util.find_spec(a.name) is None:
                        missing.append(f"{path.name}:{node.lineno}: {a.name}")
    assert not missing, missing
