import json
import logging
import os
import time
from pathlib import Path

import pytest

from tests import timing
from tests.procs import run_python

ROOT = Path(__file__).resolve().parent.parent

# The engines the tests start (children inherit this) run torch.compile'd functions eagerly: vLLM's CPU
# sampler compiles its random-sampling function in every worker while the engine starts (~14 s of CPU per
# worker, most of a tiny engine's start-up), and no test samples through it: engines run with enforce_eager,
# and every request is greedy or seeded per request (vLLM's eager path). TORCHDYNAMO_DISABLE=0 keeps it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def run_engine(spec: dict, tmp: Path, name: str, runner: str = "tests.engine_runner") -> dict:
    """One engine in a fresh process (vLLM state never leaks between engines), run by module ``runner``."""
    import torch

    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.pt"
    spec_path.write_text(json.dumps(spec))
    t = time.monotonic()
    done = run_python(["-m", runner, str(spec_path), str(out_path)], tmp / f"{name}.log", 900)
    total = time.monotonic() - t
    if done.returncode != 0:
        timing.record(name, "engine", spec["workers"] * spec.get("tp", 1), spec["model"], None, total)
        why = "no result within 900 s" if done.timed_out else f"exit {done.returncode}"
        raise AssertionError(f"engine {name} failed ({why}):\n{done.output[-8000:]}")
    out = torch.load(out_path, weights_only=False)
    timing.record(name, "engine", spec["workers"] * spec.get("tp", 1), spec["model"], out.get("start_s"), total)
    return out


class EngineRuns:
    """Session cache: each (model, workers) engine runs once, shared by all tests."""

    def __init__(self, tmp: Path):
        self.tmp, self.cache = tmp, {}

    def get(self, name: str, spec: dict, runner: str = "tests.engine_runner") -> dict:
        if name not in self.cache:
            self.cache[name] = run_engine(spec, self.tmp, name, runner)
        return self.cache[name]


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    return EngineRuns(tmp_path_factory.mktemp("engines"))


@pytest.fixture
def kvr_log(caplog):
    """The package's WARNING+ log lines. Its logger is a child of vLLM's "vllm" logger, which
    does not propagate to the root logger where caplog listens, so caplog's handler goes on it."""
    from vllm_kvrunahead.log import LOGGER_NAME, logger

    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def pytest_terminal_summary(terminalreporter):
    """Every engine the run started, slowest first: where CI's time goes."""
    lines = timing.summary_lines()
    if lines:
        terminalreporter.section("engines")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_ref(engines):
    """The tiny model on one plain vLLM worker (tests/specs.py): every tiny engine's reference."""
    from tests.specs import tiny

    return tiny(engines, 1)
