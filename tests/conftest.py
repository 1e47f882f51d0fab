import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_engine(spec: dict, tmp: Path, name: str) -> dict:
    """One engine in a fresh process (vLLM state never leaks between engines)."""
    import torch

    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.pt"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "tests.engine_runner", str(spec_path), str(out_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"engine {name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return torch.load(out_path, weights_only=False)


class EngineRuns:
    """Session cache: each (model, workers) engine runs once, shared by all tests."""

    def __init__(self, tmp: Path):
        self.tmp, self.cache = tmp, {}

    def get(self, name: str, spec: dict) -> dict:
        if name not in self.cache:
            self.cache[name] = run_engine(spec, self.tmp, name)
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
