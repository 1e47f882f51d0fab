from vllm_kvrunahead.tools.demo_models import smollm2, tiny_llama  # noqa: F401
