"""Let a step's broadcast give up once the executor is shut down.

vLLM's MultiprocExecutor sends each step to every worker through a shared-memory
ring (MessageQueue); the writer waits for every reader to have read a slot before
reusing it, with no end when called without a timeout. When a worker dies, the
executor's monitor shuts the queue down (``shutting_down``) and reports the failure
to the engine core, but the engine core thread may already be inside that wait:
it then spins forever. In plain TP every worker takes part in every step, so the output
rank fails its step first; KV-Runahead's head runs decode steps without the chain
workers, so the engine keeps broadcasting to a dead one until the ring is full.
"""
from __future__ import annotations

import contextlib
import sys
import time

from ...log import logger
from . import Patch, wrap_method

POLL_S = 0.5  # how often a blocked writer looks at the shutdown flag
WARN_EVERY_S = 60.0


class ExecutorShutDown(RuntimeError):
    """The message queue was shut down (a worker died) while the engine was sending a step."""


def _apply() -> None:
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    def make(orig):
        @contextlib.contextmanager
        def acquire_write(self, timeout: float | None = None):
            start = time.monotonic()
            warned = 0
            while True:
                left = None if timeout is None else timeout - (time.monotonic() - start)
                cm = orig(self, timeout=POLL_S if left is None else max(0.0, min(POLL_S, left)))
                try:
                    buf = cm.__enter__()
                    break
                except TimeoutError:
                    if getattr(self, "shutting_down", False):
                        raise ExecutorShutDown(
                            "vLLM's executor shut down (a worker died) while the engine was sending it "
                            "a step") from None
                    if left is not None and left <= POLL_S:
                        raise
                    waited = time.monotonic() - start
                    if waited > WARN_EVERY_S * (warned + 1):
                        warned += 1
                        logger.info("No available shared memory broadcast block found in %d seconds.",
                                    int(waited))
            try:
                yield buf
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                cm.__exit__(None, None, None)
        return acquire_write

    wrap_method(MessageQueue, "acquire_write", make)


PATCH = Patch(
    name="step-broadcast-stops-on-shutdown",
    symbol="vllm.distributed.device_communicators.shm_broadcast.MessageQueue.acquire_write",
    why="A worker that dies between steps leaves the engine core spinning forever in the step broadcast "
        "(the ring's writer waits for the dead reader with no timeout and never looks at the queue's "
        "shutdown flag, which the executor's death monitor sets). KV-Runahead's head decodes without the "
        "chain workers, so the engine keeps stepping until the ring is full, then hangs.",
    how=f"Wraps acquire_write: waits in slices of {POLL_S} s and raises once the queue is shutting down, so "
        "collective_rpc fails, the engine core stops and clients get EngineDeadError / HTTP 500. An "
        "explicit timeout is honoured as before; vLLM's 60 s 'No available shared memory broadcast block' "
        "line is kept.",
    upstream="Not upstream (vLLM 0.26.0, still so in 0.32.0): MessageQueue readers check shutting_down, "
             "the writer does not.",
    remove_when="vLLM's MessageQueue writer checks shutting_down (or collective_rpc enqueues with a bound).",
    apply=_apply,
)
