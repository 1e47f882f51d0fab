from vllm_kvrunahead.demo_models import smollm2, tiny_llama  # noqa: F401
