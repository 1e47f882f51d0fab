"""KV-Runahead prefill for vLLM (Cho et al., ICML 2024).

    vllm serve MODEL --worker-cls vllm_kvrunahead.Worker --prefill-context-parallel-size N
"""
__version__ = "0.1.0"
__all__ = ["Worker"]


def __getattr__(name):
    # Lazy: importing the package must not import vLLM (the plugin entry point and
    # the pure partition code stay light); vLLM resolves "vllm_kvrunahead.Worker".
    if name == "Worker":
        from .worker import Worker

        return Worker
    raise AttributeError(name)
