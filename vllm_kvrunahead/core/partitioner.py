"""Which split a prompt gets at run time (pure; no torch).

    partition = "auto"  (default) the shipped lookup table tuned for this model shape,
                        worker count and GPU, if there is one; else the cost model
              = "model" the cost model
              = "even"  equal segments
              = "table" the lookup table at ``table_path``

The configured split (table, override, refinement) cuts a chunk that is alone in its step with
no other work on the head: what tables and the tuner measure. A cold prompt (offset 0) uses the
table's cold entries; a chunk after c cached tokens (a prefix-cache hit, a later turn, a later
chunk) uses the entries at offsets around c (measured with chain workers holding what the
prefix's own runahead step left them, as in a conversation's next turn: ``tune._ttft``; the
lookup itself does not look at holdings). A table is used only inside what it measured:
between its first and last length, and between its first and last offset (interpolated, see
``lut.py``); outside that the cost model splits, since it extrapolates better than an entry does
and it knows the chunk's offset and what chain workers already hold. A step with several chunks
or with head-only work is balanced as one job by the cost model.

On top of that split: the tuner's fixed override (``set_override``, any lone chunk, any offset)
and, when on, the online refiner's per-length-bucket correction (cold prompts only: it learns
from cold prompts, keyed by length). Every worker builds the same Partitioner from the same
inputs, so every worker computes the same plan without exchanging it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..config import PARTITIONS as METHODS
from ..log import logger
from .lut import PartitionTable, TableError
from .partition import (
    Chunk, CostModel, ModelShape, Segment, align_bounds, balanced_split, balanced_step_bounds, check_fractions,
    even_split, fractions_of, from_fractions, runahead_gain
)
from .plan import TOO_SHORT
from .refine import Refiner

SHIPPED_TABLES = Path(__file__).parent / "tables"


@dataclass(frozen=True)
class Split:
    """A split that needs no table, in its two forms: ``prompt`` cuts one cold prompt into segments;
    ``step`` gives every chunk of a step its inner bounds, given the per-layer cost of the work only
    the head does."""

    prompt: Callable[[int, int, CostModel], tuple[Segment, ...]]
    step: Callable[[list[Chunk], int, CostModel, float], list[list[float]]]


def _even_step_bounds(chunks: list[Chunk], n_workers: int, cost: CostModel, head_extra: float) -> list[list[float]]:
    """Every chunk in N equal parts; cost and the head's other work play no part."""
    return [[c.start + c.length * (k + 1) / n_workers for k in range(n_workers - 1)] for c in chunks]


# "auto" and "table" use the cost model outside what their table measured.
SPLITS = {"even": Split(lambda n, n_workers, cost: even_split(n, n_workers), _even_step_bounds),
          "model": Split(balanced_split, balanced_step_bounds)}


def find_table(shape: ModelShape, n_workers: int, device: str,
               directory: Path = SHIPPED_TABLES) -> PartitionTable | None:
    """The first table (by file name) for this shape, N and device name, or None."""
    for path in sorted(Path(directory).glob("*.json")):
        try:
            t = PartitionTable.load(path)
        except TableError as e:  # a broken shipped file must not stop serving: fall back, loudly
            logger.warning("KV-Runahead: skipping %s", e)
            continue
        if t.n_workers == n_workers and t.info("device") == device and shape.matches(t.info("model")):
            return t
    return None


class Partitioner:
    """The run-time split (a ``plan.StepSplitter``): which chunks run ahead, and where they are cut.

    ``min_tokens`` None: a chunk runs ahead when the cost model predicts it finishes sooner on the
    chain than on the head alone; an int: when it has at least that many new tokens.
    """

    def __init__(self, method: str, n_workers: int, cost: CostModel, table: PartitionTable | None = None,
                 refiner: Refiner | None = None, *, min_tokens: int | None = None, block_size: int = 1) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown partition {method!r}; choose one of {', '.join(METHODS)}")
        if method == "table" and table is None:
            raise ValueError('partition "table" needs a table')
        if table is not None and table.n_workers != n_workers:
            raise ValueError(f"table {table.source} is for {table.n_workers} workers, not {n_workers}")
        self.method, self.n_workers, self.cost = method, n_workers, cost
        self.split = SPLITS.get(method, SPLITS["model"])
        self.table = table if method in ("auto", "table") else None
        self.refiner = refiner
        self.min_tokens, self.block_size = min_tokens, block_size
        self.override: tuple[float, ...] | None = None

    @classmethod
    def build(cls, method: str, n_workers: int, cost: CostModel, shape: ModelShape | None, device: str,
              table_path: str | None = None, refiner: Refiner | None = None,
              tables_dir: Path = SHIPPED_TABLES, **kw) -> "Partitioner":
        table = None
        if method == "table":
            table = PartitionTable.load(table_path)
            t_dev, t_model = table.info("device"), table.info("model")
            # the user chose this table: use it, but say so when it was tuned for something else
            if t_dev and t_dev != device:
                logger.warning("KV-Runahead: table %s was tuned for device %s, this is %s; using it anyway",
                               table_path, t_dev, device)
            if t_model and shape is not None and not shape.matches(t_model):
                logger.warning("KV-Runahead: table %s was tuned for model %s, this is %s; using it anyway",
                               table_path, t_model, asdict(shape))
        elif method == "auto" and shape is not None:
            table = find_table(shape, n_workers, device, tables_dir)
        return cls(method, n_workers, cost, table, refiner, **kw)

    def describe(self) -> str:
        if self.table is not None:
            rows = "; ".join(f"{r.tokens[0]}-{r.tokens[-1]} tokens " +
                             ("cold" if r.offset == 0 else f"after {r.offset} cached")
                             for r in self.table.rows)
            return f"{self.method}: table {self.table.source} for lone chunks ({rows}), cost model outside"
        if self.method == "auto":
            return "auto: cost model (no shipped table for this model shape, worker count and GPU)"
        return self.method

    def set_override(self, fractions) -> None:
        """Tuner hook: cut every prompt by these fractions (None: back to the configured split)."""
        self.override = None if fractions is None else check_fractions(fractions, self.n_workers, "override")

    def measured_fractions(self, n: int, offset: int = 0) -> tuple[float, ...] | None:
        """The override's or the table's split of n new tokens after ``offset`` cached ones; None where
        neither applies (no override, no table, or outside what the table measured)."""
        if self.override is not None:
            return self.override
        if self.table is not None and self.table.covers(n, offset):
            return self.table.fractions_for(n, offset)
        return None

    def base_fractions(self, n: int) -> tuple[float, ...]:
        """The configured split of an n-token cold prompt, before refinement."""
        measured = self.measured_fractions(n)
        if measured is not None:
            return measured
        # Outside the measured lengths the cost model extrapolates better than the nearest entry
        # (Llama-2-7B, 4x H200: the 32k entry used at 64k was 4% slower than the cost model).
        return fractions_of(self.split.prompt(n, self.n_workers, self.cost))

    def fractions(self, n: int) -> tuple[float, ...]:
        base = self.base_fractions(n)
        return self.refiner.fractions(n, base) if self.refiner is not None else base

    def __call__(self, n: int) -> tuple[Segment, ...]:
        return from_fractions(n, self.fractions(n))

    # -- plan.StepSplitter ---------------------------------------------------------------
    declined = TOO_SHORT  # the chain would not finish it sooner than the head alone

    def runs_ahead(self, chunk: Chunk) -> bool:
        if self.min_tokens is not None:
            return chunk.length >= self.min_tokens
        return runahead_gain(chunk, self.n_workers, self.cost) > 0

    def choose(self, chunks: list[Chunk], others: list[Chunk], decodes: int) -> list[bool]:
        """The chain of copies decides per chunk (``runs_ahead``, against the head alone); the head's other
        work in the step is balanced into the cut instead (``split_step``)."""
        return [True] * len(chunks)

    def split_step(self, chunks: list[Chunk], head_only: list[Chunk]) -> list[tuple[Segment, ...]]:
        """Segments of every runahead chunk of a step, block aligned. One cold prompt alone in its
        step gets the configured split (table, tuner override, refinement); one chunk after cached
        tokens alone in its step gets the override or the table where it measured that offset and
        length (what those were measured on); anything else is balanced as one job by the cost
        model, the head's other work and what chain workers hold included, or cut evenly for
        partition "even"."""
        lone = chunks[0] if len(chunks) == 1 and not head_only else None
        measured = self.measured_fractions(lone.length, lone.start) if lone is not None and lone.start > 0 else None
        if lone is not None and lone.start == 0:
            bounds = [[float(s.end) for s in self(lone.end)[:-1]]]
        elif measured is not None:
            bounds = [[lone.start + float(s.end) for s in from_fractions(lone.length, measured)[:-1]]]
        else:
            extra = sum(self.cost.layer_compute(c.start, c.end) for c in head_only)
            bounds = self.split.step(chunks, self.n_workers, self.cost, extra)
        return [align_bounds(c, b, self.block_size) for c, b in zip(chunks, bounds)]


class SplitSetting:
    """The configured split of one rank's runahead chunks (``partitioner``) and the tools that change it
    without an engine restart (the tuner's and the benchmarks' RPCs). Every rank of both modes holds one."""

    def __init__(self, kvr, cost: CostModel, shape: ModelShape | None, block_size: int, device_key: str) -> None:
        self.kvr, self.cost, self.shape, self.block_size, self.device_key = kvr, cost, shape, block_size, device_key
        self.partitioner = self._build()

    def _build(self, method: str | None = None, table: PartitionTable | None = None) -> Partitioner:
        """The configured split (no method, no table), another method, or a given table."""
        n = self.kvr.num_workers
        refiner = Refiner(n) if self.kvr.refine else None
        kw = dict(min_tokens=self.kvr.min_tokens, block_size=self.block_size)
        if table is not None:
            return Partitioner("table", n, self.cost, table, refiner, **kw)
        return Partitioner.build(method or self.kvr.partition, n, self.cost, self.shape, self.device_key,
                                 self.kvr.table_path if method is None else None, refiner, **kw)

    def set_fractions(self, fractions) -> None:
        """Cut every runahead chunk by these fractions (None: back to the configured split)."""
        self.partitioner.set_override(fractions)

    def set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        """Another partition method, or a table given as its JSON dict (None, None: the configuration)."""
        self.partitioner = self._build(
            method, PartitionTable.from_dict(table, "kvr_set_partition") if table is not None else None)
        return self.partitioner.describe()
