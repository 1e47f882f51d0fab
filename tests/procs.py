"""One way for tests to run a Python child that starts vLLM engines.

vLLM's engine core and workers are separate processes, and on vLLM 0.32 they outlive a parent that
leaves without its teardown. So output goes to a file (survivors would hold a pipe open, and the test
would wait for them), and the child runs in its own process group, killed whole once it ends (left
running, they would slow the next test).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import end_group

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Finished:
    returncode: int | None   # None: killed at the time limit
    output: str              # stdout and stderr together

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_python(args: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> Finished:
    """`python ARGS` from the repository root; the whole process group is killed when it ends."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            end_group(p)
    return Finished(rc, Path(log_path).read_text(errors="replace"))
