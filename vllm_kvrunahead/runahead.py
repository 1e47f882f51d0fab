"""The one contract between KV-Runahead's worker and its modes.

Like vLLM's KV connector (``KVConnectorBase_V1``, with ``NO_OP_KV_CONNECTOR`` for "off"): the worker talks
to one ``Runahead``; each mode implements it (``copies.rank.Chain``: the chain of copies; ``tp_layout.rank.TPLayoutRank``:
the TP layout; ``NO_RUNAHEAD``: one worker, plain vLLM), ``modes.runahead_for`` builds the right one once,
and nothing outside that factory asks which mode runs. Per step, on every rank:

    step = runahead.rewrite(scheduler_output)   # plan the step; this rank's share of vLLM's step
    runahead.run_ahead(step)                     # work before vLLM's forward (the TP layout's guest)
    ... vLLM's runner runs step.scheduler_output (None: nothing on this rank) ...
    runahead.learn(step)                         # after it (online refinement)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .core.plan import StepPlan
from .core.tp_step import TPStep


@dataclass(frozen=True)
class Step:
    plan: StepPlan | TPStep           # what ran ahead (falsy: nothing)
    scheduler_output: object          # what this rank's runner runs; None: nothing this step
    original: object                  # the scheduler output every rank received


class Runahead(Protocol):
    # vLLM reads this rank's reply: it returns its runner's output and samples for vLLM. A rank that
    # does not (a chain worker of the copies) ran a partial prefill whose sampled token is thrown away,
    # and exits at once when its runner fails, since the ranks that wait for its KV would hang.
    returns_output: bool

    def start(self, runner) -> None:
        """Once vLLM's runner has its KV caches: links warmed, split chosen."""

    def rewrite(self, scheduler_output) -> Step:
        """This step's plan and this rank's share of vLLM's step."""

    def run_ahead(self, step: Step) -> None:
        """What this rank computes ahead of vLLM's forward."""

    def learn(self, step: Step) -> None:
        """After vLLM's forward."""

    def stats(self) -> dict:
        """``kvr_stats``: one key set in every mode (README, Monitoring)."""

    def set_fractions(self, fractions) -> None:
        """Tuner hook: cut every runahead chunk by these fractions (None: the configured split)."""

    def set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        """Another partition method, or a table as its JSON dict (None, None: the configuration)."""

    def close(self) -> None:
        """At worker shutdown."""


class NoRunahead:
    """One worker: plain vLLM. Every step goes to the runner as scheduled."""

    returns_output = True

    def start(self, runner) -> None:
        pass

    def rewrite(self, scheduler_output) -> Step:
        return Step(StepPlan(1, ()), scheduler_output, scheduler_output)

    def run_ahead(self, step: Step) -> None:
        pass

    def learn(self, step: Step) -> None:
        pass

    def stats(self) -> dict:
        from .core.stats import idle_stats

        return idle_stats()

    def set_fractions(self, fractions) -> None:
        raise RuntimeError("KV-Runahead runs one worker here: there is no chain to split (start it with "
                           "--prefill-context-parallel-size N > 1 or --tensor-parallel-size N > 1)")

    def set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        self.set_fractions(None)
        return ""

    def close(self) -> None:
        pass


NO_RUNAHEAD = NoRunahead()


class SplitTuning:
    """The tuner's RPCs, alike in both modes: each rank's split is a ``SplitSetting`` (``self.split``)."""

    def set_fractions(self, fractions) -> None:
        self.split.set_fractions(fractions)

    def set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        return self.split.set_partition(method, table)
