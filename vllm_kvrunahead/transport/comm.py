"""All point-to-point traffic lives here (post, compute, wait): the chain's (``ChainComm``) and the TP
layout's KV head shards and prefix gather (``ShardComm``), flows on one base (``_Flow``).

Like ring-flash-attention's RingComm: the caller posts a receive for the next
layer's prefix KV, computes the current layer, then waits and gets the buffer;
the handles and buffers in flight never leave their flow. Sends are posted
as soon as a layer's KV is final, so transfer overlaps compute; at most
``max_sends`` stay in flight (posting one more first waits for the oldest),
so a long prompt's send copies take two layers' worth of memory, not all of
them (all 32 layers of a 40k-token MHA prefix are 21 GB). Works over any torch.distributed group: gloo on
CPU, NCCL on GPU (NCCL runs P2P on its own stream; ``Work.wait()`` then only
makes the current stream wait, no host sync).

Nothing else in the package calls torch.distributed send/recv. The one
collective, ``gather_times`` (with ``profile`` or ``refine``), runs on a CPU group.
"""
from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist


class ChainTimeout(RuntimeError):
    """A chain peer did not deliver in time (stalled or out of step)."""


class ChainPeerLost(ChainTimeout):
    """A chain peer closed its connection (its process died) before delivering."""


class _Flow:
    """What every point-to-point flow shares: the sends and receives in flight with their buffers (held until
    they complete: NCCL reads and writes them on its own stream), the byte counters, a bounded wait, the
    step's end (sends waited for, no receive left over) and its abort. ``max_sends``: at most this many
    sends in flight (posting one more first waits for the oldest); None: no bound."""

    def __init__(self, timeout_s: float | None, bounded: bool, max_sends: int | None = None) -> None:
        if max_sends is not None and max_sends < 1:
            raise ValueError(f"max_sends must be >= 1, got {max_sends}")
        self.timeout_s, self.max_sends = timeout_s, max_sends
        # gloo honours a wait timeout; NCCL's watchdog bounds GPU receives instead
        self._bounded = bounded and timeout_s is not None
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._recvs: list[tuple[int, dist.Work, torch.Tensor]] = []  # posted, oldest first
        self.bytes_sent = 0
        self.bytes_received = 0

    def _post_send(self, tensor: torch.Tensor, dst: int, group) -> None:
        tensor = tensor.contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while self.max_sends is not None and len(self._sends) >= self.max_sends:
            # NCCL: a stream wait, no host sync; the oldest copy is then free for reuse
            self._sends.pop(0)[0].wait()
        self._sends.append((dist.isend(tensor, dst=dst, group=group), tensor))

    def _post_recv(self, src: int, shape, dtype: torch.dtype, device, group) -> None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.bytes_received += buf.numel() * buf.element_size()
        self._recvs.append((src, dist.irecv(buf, src=src, group=group), buf))

    def _wait_oldest(self, count: int) -> list[torch.Tensor]:
        """The buffers of the ``count`` oldest posted receives, in posting order, once arrived (NCCL: once
        the current stream has been made to wait for them)."""
        if count > len(self._recvs):
            raise RuntimeError(f"KV-Runahead: waiting for {count} receive(s), {len(self._recvs)} posted")
        recvs, self._recvs = self._recvs[:count], self._recvs[count:]
        for src, work, _ in recvs:
            _wait(work, src, self.timeout_s, self._bounded)
        return [buf for _, _, buf in recvs]

    def wait_sends(self) -> None:
        sends, self._sends = self._sends, []
        for work, _ in sends:
            work.wait()

    def end_step(self) -> None:
        """Wait for the step's sends. Every posted receive must have been waited for by now: one
        still outstanding would be a later step's message taken early."""
        self.wait_sends()
        if self._recvs:
            n, self._recvs = len(self._recvs), []
            raise RuntimeError(f"KV-Runahead: the step ended with {n} receive(s) still outstanding")

    def abort_step(self) -> None:
        """Forget the step's sends and receives without waiting (the step raised: a peer may be
        gone, and waiting on it could block the error's way out)."""
        self._sends, self._recvs = [], []


class ChainComm(_Flow):
    """Point-to-point link of one chain worker to its predecessor and successor. It owns every
    send and receive in flight and their buffers: callers post, compute, then wait.

    prev_rank / next_rank are global ranks (None: no such link, as in a test's open chain).
    timeout_s bounds every receive on CPU backends (gloo); NCCL's own
    watchdog bounds GPU receives.
    """

    MAX_RECVS = 2  # the layer being waited for and the next one

    def __init__(
        self,
        prev_rank: int | None,
        next_rank: int | None,
        group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
        cpu_group: dist.ProcessGroup | None = None,
        max_sends: int = 2,
        prev_group: dist.ProcessGroup | None = None,
        next_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        # the link to each neighbour may use its own group (see ``for_ring``)
        self.prev_group = prev_group if prev_group is not None else group
        self.next_group = next_group if next_group is not None else group
        self.cpu_group = cpu_group
        super().__init__(timeout_s, not _is_nccl(self.prev_group), max_sends)

    @classmethod
    def for_ring(cls, topo, group: dist.ProcessGroup, cpu_group: dist.ProcessGroup | None = None,
                 timeout_s: float | None = None) -> "ChainComm":
        """This worker's links in the ring of ``topo`` (a ``ChainTopology``). The ring's closing
        link, head -> position 0, gets a process group of its own: NCCL runs one group's
        point-to-point operations in issue order on one stream per rank, and on one group the
        ring's sends and receives would wait on each other around the ring (``ring_order`` and
        ``tests/test_ring_order.py`` state and check the rule). Every rank makes the closing-link
        groups of all T chains (one per TP rank), in the same order: ``new_group`` is collective."""
        backend = dist.get_backend(group)
        rings = [dist.new_group(sorted({head, first}), backend=backend) for head, first in topo.ring_links()]
        ring = rings[topo.tp_rank]
        return cls(topo.prev_rank, topo.next_rank, group, timeout_s, cpu_group,
                   prev_group=ring if topo.pos == 0 else group,
                   next_group=ring if topo.is_head else group)

    def post_recv(self, shape, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """Queue a receive from prev into a new buffer of ``shape`` and ``dtype`` (the sender's
        tensor must match: they are the contract). At most ``MAX_RECVS`` may be outstanding."""
        if self.prev_rank is None:
            raise RuntimeError("the first chain worker has no predecessor to receive from")
        if len(self._recvs) >= self.MAX_RECVS:
            raise RuntimeError(f"KV-Runahead: {len(self._recvs)} receives are outstanding already; "
                               "wait for one before posting another")
        self._post_recv(self.prev_rank, shape, dtype, device, self.prev_group)

    def wait_recv(self) -> torch.Tensor:
        """The buffer of the oldest posted receive, once it has arrived (NCCL: once the current
        stream has been made to wait for it)."""
        if not self._recvs:
            raise RuntimeError("KV-Runahead: wait_recv without a posted receive")
        return self._wait_oldest(1)[0]

    def recv(self, shape, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Receive one tensor from prev now (post and wait)."""
        self.post_recv(shape, dtype, device)
        return self.wait_recv()

    def post_send(self, tensor: torch.Tensor) -> None:
        """Start sending ``tensor`` to next; it is kept alive until it completes."""
        if self.next_rank is None:
            raise RuntimeError("the last chain worker has no successor to send to")
        self._post_send(tensor, self.next_rank, self.next_group)

    def gather_times(self, seconds, chain_pos: int, n_workers: int, tp_size: int = 1) -> list[list[float]]:
        """Every chain position's value of each of ``seconds`` (one list per value, in chain order), in
        one all-reduce of a few bytes over the CPU group (each worker has finished its forward by then,
        so nothing waits on a GPU). With T TP ranks per stage, a position's value is the mean of its T
        ranks' (the same lists on every rank)."""
        t = torch.zeros(len(seconds), n_workers, dtype=torch.float64)
        t[:, chain_pos] = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(t, group=self.cpu_group)
        return (t / tp_size).tolist()

    def warm_up_open(self, device: torch.device) -> None:
        """``warm_up`` for a chain that is not a ring (TP layout): one tiny message down the chain."""
        hops = torch.zeros(1, device=device)
        if self.prev_rank is not None:
            hops = self.recv(1, hops.dtype, device)
        if self.next_rank is not None:
            self.post_send(hops + 1)
            self.wait_sends()
        self.bytes_sent = self.bytes_received = 0

    def warm_up(self, device: torch.device, first: bool) -> int:
        """One tiny message around the ring, so the links (NCCL's per-pair communicators are
        created lazily) exist before the first request instead of inside its TTFT. The ``first``
        chain position starts it and ends by receiving from the head. Returns the hops the
        message had made when it got here (first: all N)."""
        hops = torch.zeros(1, device=device)
        if not first:
            hops = self.recv(1, hops.dtype, device)
        self.post_send(hops + 1)
        self.wait_sends()
        if first:
            hops = self.recv(1, hops.dtype, device)
        self.bytes_sent = self.bytes_received = 0
        return int(hops.item())


def _wait(work: dist.Work, peer: int, timeout_s: float | None, bounded: bool) -> None:
    """Wait for a receive from ``peer``: bounded by ``timeout_s`` on gloo (``bounded``), with the error
    that says whether the peer died (closed its connection) or stalled."""
    t0 = time.monotonic()
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout_s)) if bounded else work.wait()
    except RuntimeError as e:  # gloo raises on timeout and on a closed connection
        waited = time.monotonic() - t0
        if timeout_s is None or waited < 0.9 * timeout_s:
            raise ChainPeerLost(
                f"KV-Runahead: chain rank {peer} closed the connection after {waited:.1f} s "
                f"of waiting for its KV (its process died or failed): {e}") from e
        raise ChainTimeout(f"KV-Runahead: no KV from chain rank {peer} within {timeout_s} s; "
                           f"the peer stalled ({e})") from e
    if ok is False:
        raise ChainTimeout(f"KV-Runahead: no KV from chain rank {peer} within {timeout_s} s")


class ShardComm(_Flow):
    """TP layout: one flow of KV head shards between the ranks (``tp_step.GuestTraffic``), beside the
    chain's ``ChainComm``: the segment shards (each rank's heads of a later rank's segment, sent back to
    it) or the prefix gather (each rank's heads of a cached prefix, sent to every rank that lacks them).

    NCCL runs one group's point-to-point operations in issue order on one stream, so every flow has
    groups of its own, and every pair of ranks one per flow (``directional``: one per direction, for a
    flow whose pairs send both ways: on one group both ranks' first sends would wait for receives that
    each has queued behind its own send). Receives come back oldest first (``wait_recvs``)."""

    def __init__(self, rank: int, world: int, backend: str, timeout_s: float | None = None,
                 directional: bool = False) -> None:
        super().__init__(timeout_s, backend != "nccl")
        self.rank = rank
        self._to: dict[int, dist.ProcessGroup] = {}    # the group of my sends to a peer
        self._from: dict[int, dist.ProcessGroup] = {}  # ... and of its sends to me
        for a in range(world):          # new_group is collective: every rank makes every pair's, in order
            for b in range(a + 1, world):
                ab = dist.new_group([a, b], backend=backend)
                ba = dist.new_group([a, b], backend=backend) if directional else ab
                if rank == a:
                    self._to[b], self._from[b] = ab, ba
                elif rank == b:
                    self._to[a], self._from[a] = ba, ab

    def post_send(self, dst: int, tensor: torch.Tensor) -> None:
        self._post_send(tensor, dst, self._to[dst])

    def post_recv(self, src: int, shape, dtype: torch.dtype, device: torch.device | str) -> None:
        self._post_recv(src, shape, dtype, device, self._from[src])

    def wait_recvs(self, count: int | None = None) -> list[torch.Tensor]:
        """The buffers of the ``count`` oldest posted receives (None: all), in the order they were
        posted, once arrived."""
        return self._wait_oldest(len(self._recvs) if count is None else count)

    def warm_up(self, device: torch.device) -> None:
        """One tiny message each way between every pair, so the links (NCCL's communicators are made
        lazily) exist before the first request. The lower rank of a pair sends first, the higher receives
        first: on a pair's one group (not ``directional``) NCCL then pairs them in issue order."""
        for peer in sorted(self._to):
            one = torch.zeros(1, device=device)
            if self.rank < peer:
                self.post_send(peer, one)
                self.post_recv(peer, (1,), one.dtype, device)
            else:
                self.post_recv(peer, (1,), one.dtype, device)
                self.post_send(peer, one)
        self.wait_recvs()
        self.end_step()
        self.bytes_sent = self.bytes_received = 0


def _is_nccl(group: dist.ProcessGroup | None) -> bool:
    try:
        return dist.get_backend(group) == "nccl"
    except Exception:  # noqa: BLE001 - not initialized / unknown group
        return False
