"""The package's logger: a child of vLLM's "vllm" logger, so its lines appear with vLLM's
handler, format and level (VLLM_LOGGING_LEVEL) in every process vLLM configures, without
this module importing vLLM (the pure planning code logs through it too)."""
import logging

LOGGER_NAME = "vllm.kvrunahead"
logger = logging.getLogger(LOGGER_NAME)
