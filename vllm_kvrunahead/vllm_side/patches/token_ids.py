"""Refuse out-of-vocabulary prompt token ids in the frontend when vLLM has no tokenizer to check them.

With --skip-tokenizer-init vLLM checks prompt ids against the tokenizer only, so an id >= the model's
vocabulary reaches the workers, the embedding raises, and the whole engine dies for one bad request
(plain vLLM 0.26 too). With KV-Runahead a failed step also strands the chain's in-flight KV; the
request is refused with HTTP 400 instead, before it reaches any worker.
"""
from __future__ import annotations

from ...config import COPIES, TP_LAYOUT, mode_of
from . import Patch, wrap_method


def check_prompt_ids(ids, vocab_size: int, error: type[Exception] = ValueError) -> None:
    if not ids:
        return
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise error(f"Token id {lo if lo < 0 else hi} is out of vocabulary (the model has {vocab_size} "
                    "tokens: ids 0 .. {})".format(vocab_size - 1))


def _apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from ..seam import RequestError, frontend_tokenizer

    def make(orig):
        def _validate_model_input(self, prompt_input, prompt_type, *args, **kwargs):
            orig(self, prompt_input, prompt_type, *args, **kwargs)
            if (mode_of(self.vllm_config) not in (COPIES, TP_LAYOUT) or prompt_input.get("type") == "embeds"
                    or frontend_tokenizer(self) is not None):
                return  # plain vLLM, or vLLM checked the ids against its tokenizer itself
            check_prompt_ids(prompt_input.get("prompt_token_ids"), self.model_config.get_vocab_size(), RequestError)
        return _validate_model_input

    wrap_method(InputProcessor, "_validate_model_input", make)


PATCH = Patch(
    name="prompt-ids-checked-without-tokenizer",
    symbol="vllm.v1.engine.input_processor.InputProcessor._validate_model_input",
    why="With --skip-tokenizer-init, vLLM checks prompt token ids only against a tokenizer, so an "
        "out-of-vocabulary id reaches the workers and kills the engine (IndexError in the embedding; plain "
        "vLLM 0.26 too). One bad request must get an error, not stop the server.",
    how="Wraps the frontend's per-prompt validation: for KV-Runahead engines without a tokenizer, after "
        "vLLM's own checks, refuses ids < 0 or >= the model's vocabulary size with vLLM's VLLMValidationError (HTTP 400), "
        "before the request reaches the engine core. Engines with a tokenizer and plain vLLM are untouched.",
    upstream="Not upstream: vLLM skips the id check when the tokenizer is not initialized (0.26 "
             "InputProcessor._validate_model_input, 0.32 BaseRenderer.validate_token_ids).",
    remove_when="vLLM checks prompt ids against the model's vocabulary size without a tokenizer.",
    apply=_apply,
)
