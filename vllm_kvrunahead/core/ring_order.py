"""The order in which one chain worker issues its sends and receives in a step (pure).

NCCL runs one process group's point-to-point operations in issue order, on one stream per
rank, and a send completes only together with its matching receive. The issue order is
therefore part of the protocol: the connector executes ``step_order`` as it is, and
``tests/test_ring_order.py`` runs it for whole rings under those rules (and shows that the
orders one might write instead deadlock or stall).

- The ring's closing link, head -> position 0, has a process group of its own
  (``ChainComm.for_ring``): on the world group's stream, with the rest of the chain's traffic,
  the head's prefix sends and position 0's prefix receives wait on each other around the ring.
- ``send_prefix``: the head sends the cached prefix ``PREFIX_LEAD`` layers ahead of the layer it
  computes, so position 0 starts a layer without waiting for the head's compute.
- ``recv``: the next layer's receive is posted before this layer's is waited for, so the
  transfer overlaps this layer's compute.
- ``send_on_entry``: the layer's send goes before the next layer's receive; posted after it, it
  would wait in the stream for the predecessor's next layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

PREFIX_LEAD = 2  # layers by which the head's prefix sends lead its own compute
MESSAGES = ("recv", "send", "send_prefix", "upfront_send", "upfront_recv")  # Role's, named as RunaheadMeta's

SEND, POST_RECV, WAIT_RECV = "send", "post_recv", "wait_recv"
UPFRONT, PREFIX, LAYER = "upfront", "prefix", "layer"


class Op(NamedTuple):
    """One point-to-point operation: kind (SEND, POST_RECV, WAIT_RECV), message (UPFRONT: all
    layers once, before the forward; PREFIX: the head's cached prefix; LAYER: the per-layer KV)
    and layer (None for UPFRONT). Sends go to the successor, receives come from the predecessor."""

    kind: str
    msg: str
    layer: int | None = None


@dataclass(frozen=True)
class Role:
    """What a worker moves in one step (the kinds of ``RunaheadMeta``'s messages it has)."""

    layers: int
    recv: bool = False          # per layer, from the predecessor
    send: bool = False          # per layer, to the successor
    send_prefix: bool = False    # per layer, the cached prefix, head -> position 0
    upfront_send: bool = False  # all layers once, head -> position 0
    upfront_recv: bool = False
    send_on_entry: bool = False  # `send` at the layer's attention entry, not after its attention


@dataclass(frozen=True)
class StepOrder:
    """The operations at the start of the step, at each layer's attention entry and after each
    layer's attention, each in issue order."""

    start: tuple[Op, ...]
    entry: tuple[tuple[Op, ...], ...]
    exit: tuple[tuple[Op, ...], ...]


def step_order(role: Role) -> StepOrder:
    n = role.layers
    start: list[Op] = []
    if role.upfront_send:
        start.append(Op(SEND, UPFRONT))
    if role.upfront_recv:
        start += [Op(POST_RECV, UPFRONT), Op(WAIT_RECV, UPFRONT)]
    if role.send_prefix:
        start += [Op(SEND, PREFIX, layer) for layer in range(min(PREFIX_LEAD, n))]
    if role.recv and n:
        start.append(Op(POST_RECV, LAYER, 0))
    entries, exits = [], []
    for layer in range(n):
        entry: list[Op] = []
        if role.send_prefix and layer + PREFIX_LEAD < n:
            entry.append(Op(SEND, PREFIX, layer + PREFIX_LEAD))
        next_recv = [Op(POST_RECV, LAYER, layer + 1)] if role.recv and layer + 1 < n else []
        wait = [Op(WAIT_RECV, LAYER, layer)] if role.recv else []
        send = [Op(SEND, LAYER, layer)] if role.send else []
        if role.send_on_entry:
            entry += wait + send + next_recv
            exits.append(())
        else:
            entry += next_recv + wait
            exits.append(tuple(send))
        entries.append(tuple(entry))
    return StepOrder(tuple(start), tuple(entries), tuple(exits))
