"""The chain over real gloo processes: exact delivery, and the reference prefill
run by N processes equals the one-process prefill."""
import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from vllm_kvrunahead.core.partition import balanced_split, even_split
from vllm_kvrunahead.tools.reference import TinyConfig, TinyLlama
from vllm_kvrunahead.transport.comm import ChainComm, PeerLost, PeerTimeout


def _relay(rank, world, layers):
    """Each rank receives layer tensors from rank-1, appends its own rows, sends on."""
    comm = ChainComm(rank - 1 if rank else None, rank + 1 if rank < world - 1 else None)
    got = []
    for layer in range(layers):
        own = torch.full((2, 3), float(rank * 100 + layer)) + torch.arange(6.0).view(2, 3) / 7
        if rank:
            buf = comm.recv((rank * 2, 3))
            got.append(buf)
            own = torch.cat([buf, own])
        if comm.next_rank is not None:
            comm.post_send(own)
    comm.wait_sends()
    return got, comm.bytes_sent, comm.bytes_received


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_chain_delivers_exact_tensors(world):
    layers = 3
    results = run_ranks(_relay, world, layers)
    for rank, (got, sent, received) in enumerate(results):
        assert len(got) == (layers if rank else 0)
        for layer, buf in enumerate(got):
            expect = torch.cat([
                torch.full((2, 3), float(r * 100 + layer)) + torch.arange(6.0).view(2, 3) / 7
                for r in range(rank)])
            assert torch.equal(buf, expect)  # bit-exact
        assert received == layers * rank * 2 * 3 * 4
        assert sent == (layers * (rank + 1) * 2 * 3 * 4 if rank < world - 1 else 0)


def _chain_prefill(rank, world, n, method):
    torch.manual_seed(0)
    model = TinyLlama(TinyConfig(), seed=1)
    tokens = torch.randint(0, model.cfg.vocab, (n,), generator=torch.Generator().manual_seed(2))
    seg = (even_split if method == "even" else balanced_split)(n, world)[rank]
    comm = ChainComm(rank - 1 if rank else None, rank + 1 if rank < world - 1 else None)
    logits, kv = model.prefill_segment(tokens, seg, comm)
    return seg, logits, kv


@pytest.mark.parametrize("world, n, method", [
    (2, 37, "even"), (3, 101, "balanced"), (4, 203, "balanced"), (4, 7, "even"), (8, 61, "balanced")])
def test_reference_chain_prefill_matches_one_process(world, n, method):
    assert n % world != 0
    results = run_ranks(_chain_prefill, world, n, method)
    model = TinyLlama(TinyConfig(), seed=1)
    tokens = torch.randint(0, model.cfg.vocab, (n,), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_kv = model.prefill(tokens)
    seg, logits, kv = results[-1]  # the head: last segment, whole KV
    assert seg.end == n and seg.start > 0
    # fp32; same math on fewer rows: tolerance atol=rtol=1e-5
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.argmax(logits) == torch.argmax(ref_logits)
    for layer in range(model.cfg.layers):
        torch.testing.assert_close(kv[layer], ref_kv[layer], atol=1e-5, rtol=1e-5)
    for seg_k, _, kv_k in results[:-1]:  # every worker holds the KV prefix it computed or got
        for layer in range(model.cfg.layers):
            torch.testing.assert_close(kv_k[layer], ref_kv[layer][:, : seg_k.end], atol=1e-5, rtol=1e-5)


def _stalled_peer(rank, world):
    comm = ChainComm(rank - 1 if rank else None, None, timeout_s=2.0)
    if rank == 0:
        import time
        time.sleep(4)  # never sends: rank 1 must give up, not hang
        return "slept"
    try:
        comm.recv(4)
    except PeerTimeout as e:
        return str(e)
    return "no error"


def test_receive_from_stalled_peer_times_out():
    _, msg = run_ranks(_stalled_peer, 2)
    assert "no KV from chain rank 0 within 2.0 s" in msg


def _vanishing_peer(rank, world):
    import time

    comm = ChainComm(rank - 1 if rank else None, None, timeout_s=60.0)
    if rank == 0:
        time.sleep(1)
        return "left"  # its process group is destroyed: the connection closes, nothing was sent
    t0 = time.monotonic()
    try:
        comm.recv(4)
    except PeerLost as e:
        return str(e), time.monotonic() - t0
    return "no error"


def test_receive_from_a_peer_that_closed_the_connection_says_so_at_once():
    _, (msg, waited) = run_ranks(_vanishing_peer, 2)
    assert waited < 30, waited   # not the 60 s receive timeout
    assert "chain rank 0 closed the connection" in msg and "within" not in msg, msg


def _warm(rank, world):
    comm = ChainComm((rank - 1) % world, (rank + 1) % world, timeout_s=30)  # the ring: 0 -> 1 -> 2 -> 0
    hops = comm.warm_up(torch.device("cpu"), first=rank == 0)
    return hops, comm.bytes_sent, comm.bytes_received


def test_warm_up_goes_around_the_ring_and_resets_counters():
    assert run_ranks(_warm, 3) == [(3, 0, 0), (1, 0, 0), (2, 0, 0)]


def _bounded_sends(rank, world, layers):
    """Rank 0 posts every layer's send without waiting; rank 1 receives them late."""
    import time

    comm = ChainComm(None if rank == 0 else 0, 1 if rank == 0 else None, max_sends=2)
    if rank == 0:
        in_flight = []
        for layer in range(layers):
            comm.post_send(torch.full((1000,), float(layer)))
            in_flight.append(len(comm._sends))
        comm.wait_sends()
        return in_flight
    time.sleep(0.5)  # a slow receiver: the sender must not pile up copies meanwhile
    got = []
    for _ in range(layers):
        got.append(comm.recv(1000)[0].item())
    return got


def test_sends_in_flight_are_bounded():
    """A long prompt's per-layer send copies: at most max_sends alive, all delivered in order."""
    in_flight, got = run_ranks(_bounded_sends, 2, 6)
    assert max(in_flight) == 2
    assert got == [float(i) for i in range(6)]


def _guarded(rank, world):
    """Receives stay in ChainComm: two may be outstanding, they come back oldest first, and a
    step may not end with one outstanding (an aborted step may)."""
    import time

    comm = ChainComm(None if rank == 0 else 0, 1 if rank == 0 else None, timeout_s=30)
    if rank == 0:
        for value in range(3):
            comm.post_send(torch.full((2,), float(value)))
        comm.wait_sends()
        return None
    errors = []
    comm.post_recv(2)
    comm.post_recv(2)
    try:
        comm.post_recv(2)
    except RuntimeError as e:
        errors.append(str(e))
    got = [comm.wait_recv().tolist()]
    time.sleep(0.5)  # the second message arrives meanwhile
    try:
        comm.end_step()
    except RuntimeError as e:
        errors.append(str(e))
    try:
        comm.wait_recv()
    except RuntimeError as e:
        errors.append(str(e))
    comm.post_recv(2)
    time.sleep(0.5)
    comm.abort_step()   # an aborted step drops what is outstanding, silently
    comm.end_step()
    return got, errors


def test_receives_are_guarded_against_misuse():
    _, (got, errors) = run_ranks(_guarded, 2)
    assert got == [[0.0, 0.0]]
    assert "2 receives are outstanding already" in errors[0]
    assert "the step ended with 1 receive(s) still outstanding" in errors[1]
    assert "wait_recv without a posted receive" in errors[2]
    assert len(errors) == 3


def test_the_first_worker_has_no_predecessor():
    with pytest.raises(RuntimeError, match="no predecessor"):
        ChainComm(None, 1).post_recv(2)


def _gather(rank, world):
    return ChainComm(None, None).gather_times((rank + 0.5, -rank), rank, world)


def test_gather_times_in_chain_order():
    results = run_ranks(_gather, 3)
    assert results == [[[0.5, 1.5, 2.5], [0.0, -1.0, -2.0]]] * 3   # one all-reduce, one list per value


def _ring(rank, world, layers):
    """The ring as workers build it: head = last rank; the head sends its 'prefix' to position 0
    over the closing link's own group, the rest relays down the chain to the head."""
    from vllm_kvrunahead.core.topology import ChainTopology

    topo = ChainTopology(world, world - 1, rank)
    comm = ChainComm.for_ring(topo, dist.group.WORLD, timeout_s=30)
    own_groups = (comm.prev_group is not dist.group.WORLD, comm.next_group is not dist.group.WORLD)
    got = []
    for layer in range(layers):
        if topo.is_head:
            comm.post_send(torch.full((2,), float(layer)))          # the cached prefix, ahead
        buf = comm.recv(2 + 2 * topo.pos)
        got.append(buf.tolist())
        if not topo.is_head:
            comm.post_send(torch.cat([buf, torch.full((2,), float(10 * (rank + 1) + layer))]))
    comm.wait_sends()
    return own_groups, got


@pytest.mark.parametrize("world", [2, 3])
def test_ring_closes_through_the_head_on_a_group_of_its_own(world):
    results = run_ranks(_ring, world, 2)
    for rank, (own_groups, got) in enumerate(results):
        pos = rank  # head = last rank: positions equal ranks
        assert own_groups == (pos == 0, pos == world - 1)
        for layer, buf in enumerate(got):
            want = [float(layer)] * 2 + [float(10 * (r + 1) + layer) for r in range(pos) for _ in range(2)]
            assert buf == want


def test_topology_of_stages_of_tp_groups_follows_vllms_rank_layout():
    """S=3 stages x T=2 TP ranks: rank = stage * T + tp_rank (vLLM's TP-innermost layout); the head
    stage is the last (vLLM's output rank world - T is its TP rank 0); one chain per TP rank."""
    from vllm_kvrunahead.core.topology import ChainTopology

    S, T = 3, 2
    topos = [ChainTopology(S, S * T - T, r, T) for r in range(S * T)]
    assert [(t.stage, t.tp_rank, t.pos, t.is_head) for t in topos] == [
        (0, 0, 0, False), (0, 1, 0, False), (1, 0, 1, False), (1, 1, 1, False), (2, 0, 2, True), (2, 1, 2, True)]
    assert topos[0].chain() == [0, 2, 4] and topos[1].chain() == [1, 3, 5]
    assert [(t.prev_rank, t.next_rank) for t in topos] == [(4, 2), (5, 3), (0, 4), (1, 5), (2, 0), (3, 1)]
    assert all(t.ring_links() == [(4, 0), (5, 1)] for t in topos)
    # T = 1 is plain KV-Runahead: positions are ranks, the head is the last
    plain = [ChainTopology(3, 2, r) for r in range(3)]
    assert [(t.pos, t.prev_rank, t.next_rank, t.is_head) for t in plain] == [
        (0, 2, 1, False), (1, 0, 2, False), (2, 1, 0, True)]
    with pytest.raises(ValueError, match="not TP rank 0"):
        ChainTopology(2, 3, 0, 2)


def _tp_ring(rank, world, tp, layers):
    """Two chains side by side (S = world / tp stages, T = tp): each rank relays its own 'KV shard'
    down its TP rank's chain; the heads send their prefix to position 0 over their own ring link."""
    from vllm_kvrunahead.core.topology import ChainTopology

    s = world // tp
    topo = ChainTopology(s, world - tp, rank, tp)
    comm = ChainComm.for_ring(topo, dist.group.WORLD, timeout_s=30)
    got = []
    for layer in range(layers):
        if topo.is_head:
            comm.post_send(torch.full((2,), float(100 * topo.tp_rank + layer)))
        buf = comm.recv(2 + 2 * topo.pos)
        got.append(buf.tolist())
        if not topo.is_head:
            comm.post_send(torch.cat([buf, torch.full((2,), float(1000 * topo.tp_rank + 10 * (topo.stage + 1) + layer))]))
    comm.wait_sends()
    (times,) = comm.gather_times((1.0 + topo.tp_rank,), topo.pos, s, tp)
    return topo.tp_rank, topo.pos, got, times


def test_tp_stages_make_independent_chains_one_per_tp_rank():
    world, tp = 6, 2   # S=3 x T=2
    for r, pos, got, times in run_ranks(_tp_ring, world, tp, 2):
        for layer, buf in enumerate(got):
            want = [float(100 * r + layer)] * 2 + [float(1000 * r + 10 * (st + 1) + layer)
                                                   for st in range(pos) for _ in range(2)]
            assert buf == want, (r, pos, layer)
        assert times == [1.5, 1.5, 1.5]   # a position's time: the mean over its TP ranks
