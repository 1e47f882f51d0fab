"""The chain's issue order (``ring_order.step_order``) run for whole rings under NCCL's rules (pure).

The simulation: per rank, one in-order stream per process group (the closing link head ->
position 0 has a group of its own, as ``ChainComm.for_ring`` makes it; every other link is on
the world group); a send and its receive complete together when both are at the head of their
streams (a rendezvous); layer l's compute waits for the receives waited for before it and for
layer l-1; a layer's send waits for that layer's KV (its attention; with send_on_entry, the entry
after its receive), the head's prefix and upfront sends for nothing. ``strict`` adds what NCCL
under torch does on top: every operation also waits for the compute issued before it (the NCCL
stream waits on the current stream), and a send beyond ``max_sends`` in flight makes the compute
wait for the oldest (``ChainComm.post_send``).
"""
import itertools

import pytest

from vllm_kvrunahead.core.ring_order import (
    LAYER, POST_RECV, PREFIX, PREFIX_LEAD, SEND, UPFRONT, WAIT_RECV, Op, Role, StepOrder, step_order
)


def roles(n, layers, links, upfront=False, send_on_entry=False):
    """Each chain position's role when the per-layer links in ``links`` carry KV (link k: k -> k+1;
    link n-1: head -> position 0, the cached prefix). upfront: head -> position 0, once."""
    head = n - 1
    return [Role(layers, recv=(pos - 1) % n in links, send=pos != head and pos in links,
                 send_prefix=pos == head and head in links, upfront_send=upfront and pos == head,
                 upfront_recv=upfront and pos == 0, send_on_entry=send_on_entry)
            for pos in range(n)]


class Deadlock(AssertionError):
    pass


def program(order: StepOrder):
    """The worker's host program: (phase, layer, op) with ("compute", l, None) between layer l's
    entry and exit operations."""
    out = [("start", None, op) for op in order.start]
    for layer, (entry, exit_) in enumerate(zip(order.entry, order.exit)):
        out += [("entry", layer, op) for op in entry] + [("compute", layer, None)]
        out += [("exit", layer, op) for op in exit_]
    return out


def simulate(orders: list[StepOrder], *, one_group=False, strict=False, max_sends=2):
    """Run one step of every chain position; returns each event's completion round (("C", pos, l):
    layer l's compute; ("op", pos, i): the i-th point-to-point operation of ``pos``). Raises
    Deadlock when some operation can never complete."""
    n, head = len(orders), len(orders) - 1
    deps, ops, streams = {}, {}, {}
    for pos, order in enumerate(orders):
        waited, last, in_flight, posted = set(), set(), [], {}
        for i, (phase, layer, op) in enumerate(program(order)):
            if phase == "compute":
                deps[("C", pos, layer)] = last | waited
                last = {("C", pos, layer)}
                continue
            ev = ("op", pos, i)
            key = op.msg if op.msg == UPFRONT else op.layer
            if op.kind == WAIT_RECV:
                waited.add(posted.pop(key))
                continue
            if op.kind == POST_RECV:
                posted[key] = ev
                peer = src = (pos - 1) % n
                dst = pos
                deps[ev] = last | waited if strict else set()
            else:
                if strict and len(in_flight) >= max_sends:
                    waited.add(in_flight.pop(0))
                in_flight.append(ev)
                if strict:
                    deps[ev] = last | waited
                elif op.msg != LAYER:
                    deps[ev] = set()    # the cached prefix is there before the step
                elif phase == "exit":
                    deps[ev] = {("C", pos, op.layer)}
                else:                   # at the entry: the layer's QKV (after layer l-1) and its receive
                    deps[ev] = last | waited
                src, peer = pos, (pos + 1) % n
                dst = peer
            group = "ring" if (src, dst) == (head, 0) and not one_group else "world"
            ops[ev] = (pos, peer, op, (pos, group))
            streams.setdefault((pos, group), []).append(ev)
        assert not posted, f"position {pos} ends its step with receives outstanding: {posted}"
    return _run(deps, ops, streams)


def _matches(send: Op, recv: Op) -> bool:
    return (send.msg == UPFRONT) == (recv.msg == UPFRONT) and send.layer == recv.layer


def _run(deps, ops, streams):
    done: dict = {}
    heads = {key: 0 for key in streams}
    computes = {ev for ev in deps if ev[0] == "C"}
    t = 0
    while True:
        t += 1
        ready = lambda ev: all(done.get(d, t) < t for d in deps[ev])  # noqa: E731
        new = [ev for ev in computes if ev not in done and ready(ev)]
        for key, evs in streams.items():
            if heads[key] == len(evs):
                continue
            ev = evs[heads[key]]
            pos, peer, op, (_, group) = ops[ev]
            peer_key = (peer, group)
            if op.kind != SEND or heads.get(peer_key, 0) == len(streams.get(peer_key, ())):
                continue
            other = streams[peer_key][heads[peer_key]]
            _, src, recv, _ = ops[other]
            if recv.kind == POST_RECV and src == pos and ready(ev) and ready(other):
                assert _matches(op, recv), f"{pos} -> {peer}: {op} arrives in {recv}"
                new += [ev, other]
        if not new:
            break
        for ev in new:
            done[ev] = t
            if ev[0] == "op":
                heads[ops[ev][3]] += 1
    if len(done) < len(deps):
        stuck = {key: ops[evs[heads[key]]][2] for key, evs in streams.items() if heads[key] < len(evs)}
        raise Deadlock(f"stuck stream heads (position, group): {stuck}")
    return done


def ring_orders(n, layers, *, ring, send_on_entry=False, upfront=None, links=None, order=step_order):
    """Every position's order for a step on the chain (ring: after a cached prefix, the head ->
    position 0 link carries it; upfront defaults to ring)."""
    links = set(range(n) if ring else range(n - 1)) if links is None else links
    upfront = ring if upfront is None else upfront
    return [order(r) for r in roles(n, layers, links, upfront, send_on_entry)]


def _subsets(items):
    return [set(c) for k in range(len(items) + 1) for c in itertools.combinations(items, k)]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("send_on_entry", [False, True])
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("layers", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_step_completes(n, layers, ring, send_on_entry, strict):
    """Any subset of the chain's links may carry KV (a position may hold its prefix already);
    the closing link carries the cached prefix in a ring step, with or without the upfront block."""
    for links in _subsets(range(n - 1)):
        for upfront in ([False, True] if ring else [False]):
            orders = ring_orders(n, layers, ring=ring, send_on_entry=send_on_entry, upfront=upfront,
                                 links=links | ({n - 1} if ring else set()))
            done = simulate(orders, strict=strict)
            assert all(("C", pos, layers - 1) in done for pos in range(n))


def test_order_of_a_middle_worker_and_the_head():
    mid = step_order(Role(3, recv=True, send=True))
    assert mid.start == (Op(POST_RECV, LAYER, 0),)
    assert mid.entry[0] == (Op(POST_RECV, LAYER, 1), Op(WAIT_RECV, LAYER, 0))
    assert mid.entry[2] == (Op(WAIT_RECV, LAYER, 2),)
    assert mid.exit == ((Op(SEND, LAYER, 0),), (Op(SEND, LAYER, 1),), (Op(SEND, LAYER, 2),))
    early = step_order(Role(3, recv=True, send=True, send_on_entry=True))
    assert early.entry[0] == (Op(WAIT_RECV, LAYER, 0), Op(SEND, LAYER, 0), Op(POST_RECV, LAYER, 1))
    assert early.exit == ((), (), ())
    head = step_order(Role(5, recv=True, send_prefix=True, upfront_send=True))
    assert head.start == (Op(SEND, UPFRONT), Op(SEND, PREFIX, 0), Op(SEND, PREFIX, 1), Op(POST_RECV, LAYER, 0))
    assert [op for entry in head.entry for op in entry if op.kind == SEND] == [
        Op(SEND, PREFIX, layer) for layer in range(PREFIX_LEAD, 5)]
    assert step_order(Role(1, send_prefix=True)).start == (Op(SEND, PREFIX, 0),)
    assert step_order(Role(4)) == StepOrder((), ((),) * 4, ((),) * 4)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("n, layers", [(3, 3), (3, 5), (4, 3), (4, 5)])
def test_the_whole_ring_on_one_group_deadlocks(n, layers, strict):
    """Why the closing link has a group of its own: on one group the head's prefix send of layer
    2 queues behind its receive of layer 0, which waits through the chain for position 0, whose
    stream waits at its receive of that prefix."""
    orders = ring_orders(n, layers, ring=True)
    simulate(orders, strict=strict)
    with pytest.raises(Deadlock):
        simulate(orders, one_group=True, strict=strict)


def receive_first(order: StepOrder) -> StepOrder:
    """send_on_entry's order with the next layer's receive posted before the layer's send."""
    entry = tuple(tuple(sorted(ops, key=lambda op: op.kind != POST_RECV if op.msg == LAYER else -1))
                  for ops in order.entry)
    return StepOrder(order.start, entry, order.exit)


def test_receive_first_reorders_only_the_layer_receive():
    order = step_order(Role(3, recv=True, send=True, send_on_entry=True))
    assert receive_first(order).entry[0] == (Op(POST_RECV, LAYER, 1), Op(WAIT_RECV, LAYER, 0), Op(SEND, LAYER, 0))
    assert receive_first(order).entry[2] == order.entry[2]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("layers", [3, 5])
def test_send_on_entry_with_the_receive_first_deadlocks_a_ring_on_one_group(layers, strict):
    """On a ring of 3 on one group the send_on_entry order alone decides: send, then post the
    next receive completes; the other way round deadlocks."""
    simulate(ring_orders(3, layers, ring=True, send_on_entry=True), one_group=True, strict=strict)
    with pytest.raises(Deadlock):
        simulate(ring_orders(3, layers, ring=True, send_on_entry=True, order=lambda r: receive_first(step_order(r))),
                 one_group=True, strict=strict)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("n", [3, 4])
def test_send_on_entry_with_the_receive_first_waits_for_the_predecessors_next_layer(n, ring, strict):
    """On the ring as built it completes, but a worker's send of layer l then queues behind its
    receive of layer l+1: the successor waits for the predecessor's next layer, which is what
    sending at the entry was to avoid."""
    layers = 5

    def sends(orders, done):
        out = {}
        for pos, order in enumerate(orders):
            for i, (_, _, op) in enumerate(program(order)):
                if op is not None and op.kind == SEND and op.msg == LAYER:
                    out[pos, op.layer] = done[("op", pos, i)]
        return out

    for order, later in ((step_order, False), (lambda r: receive_first(step_order(r)), True)):
        orders = ring_orders(n, layers, ring=ring, send_on_entry=True, order=order)
        sent = sends(orders, simulate(orders, strict=strict))
        for pos in range(1, n - 1):
            for layer in range(layers - 1):
                assert (sent[pos, layer] > sent[pos - 1, layer + 1]) == later, (pos, layer)
