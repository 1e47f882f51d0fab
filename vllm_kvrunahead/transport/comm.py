"""All point-to-point traffic lives here (post, compute, wait): the chain's (``ChainComm``) and the TP
layout's rounds of KV head shards and prefix gather (``RoundComm``), flows on one base (``_Flow``), and
the TP layout's comm buffers (``CommArena``).

Like ring-flash-attention's RingComm: the caller posts a receive for the next
layer's prefix KV, computes the current layer, then waits and gets the buffer;
the handles and buffers in flight never leave their flow. Sends are posted
as soon as a layer's KV is final, so transfer overlaps compute; at most
``max_sends`` stay in flight (posting one more first waits for the oldest),
so a long prompt's send copies take two layers' worth of memory, not all of
them (all 32 layers of a 40k-token MHA prefix are 21 GB). Works over any torch.distributed group: gloo on
CPU, NCCL on GPU (NCCL runs P2P on its own stream; ``Work.wait()`` then only
makes the current stream wait, no host sync).

Nothing else in the package calls torch.distributed send/recv, and no ``dist.Work`` leaves this module
(a round's works stay in its ``Batch``). The one collective, ``gather_times`` (with ``profile`` or
``refine``), runs on a CPU group.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerTimeout(RuntimeError):
    """A peer did not deliver in time (stalled or out of step)."""


class PeerLost(PeerTimeout):
    """A peer closed its connection (its process died) before delivering."""


class CommFull(RuntimeError):
    """A step's messages do not fit their comm buffer (the plan keeps every step within ``CommArena``)."""


class _Flow:
    """What every point-to-point flow shares: the sends, receives and batches in flight with their buffers
    (held until they complete: NCCL reads and writes them on its own stream), the byte counters, a bounded
    wait, the step's end (sends and batches waited for, no receive left over) and its abort.
    ``max_sends``: at most this many sends in flight (posting one more first waits for the oldest); None: no
    bound. ``send_slots`` / ``recv_slots``: preallocated buffers (``CommArena``) that messages take in turn
    instead of new tensors; ``label``: how errors name this flow's peers ("chain rank 1")."""

    def __init__(self, timeout_s: float | None, bounded: bool, max_sends: int | None = None,
                 send_slots: list[torch.Tensor] | None = None, recv_slots: list[torch.Tensor] | None = None,
                 label: str = "chain rank") -> None:
        if max_sends is not None and max_sends < 1:
            raise ValueError(f"max_sends must be >= 1, got {max_sends}")
        if send_slots and (max_sends is None or len(send_slots) < max_sends):
            raise ValueError(f"{len(send_slots)} send slots for {max_sends} sends in flight")
        self.timeout_s, self.max_sends, self.label = timeout_s, max_sends, label
        self.about = ""   # what errors add after a peer's name: a round flow's name
        # gloo honours a wait timeout; NCCL's watchdog bounds GPU receives instead
        self._bounded = bounded and timeout_s is not None
        self._sends: list[tuple[dist.Work, torch.Tensor, int]] = []   # (work, tensor, destination)
        self._recvs: list[tuple[int, dist.Work, torch.Tensor]] = []  # posted, oldest first
        self._batches: list[Batch] = []  # this step's batches, until the step's end waits for them
        self._send_slots, self._recv_slots = send_slots or None, recv_slots or None
        self._slot_sends = self._slot_recvs = 0   # messages that took a slot: the next one takes the next slot
        self.bytes_sent = 0
        self.bytes_received = 0

    def _post_send(self, tensor: torch.Tensor, dst: int, group) -> None:
        tensor = tensor.contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while self.max_sends is not None and len(self._sends) >= self.max_sends:
            # NCCL: a stream wait, no host sync; the oldest copy is then free for reuse
            self._wait_send(*self._sends.pop(0))
        self._sends.append((dist.isend(tensor, dst=dst, group=group), tensor, dst))

    def send_copy(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``cache``'s ``blocks`` (dim 0) as one tensor to send: a new one, or the next send slot once the
        send that last used it is done (NCCL: the current stream waits for it; no host sync)."""
        if self._send_slots is None:
            return cache.index_select(0, blocks)
        while len(self._sends) >= len(self._send_slots):
            self._wait_send(*self._sends.pop(0))
        slot = self._send_slots[self._slot_sends % len(self._send_slots)]
        self._slot_sends += 1
        out = slot_views(slot, [(len(blocks), *cache.shape[1:])], cache.dtype, "chain_send")[0]
        return torch.index_select(cache, 0, blocks, out=out)

    def _post_recv(self, src: int, shape, dtype: torch.dtype, device, group) -> None:
        if self._recv_slots is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
        else:   # the slot's last receive has been waited for and landed (on the stream this one follows)
            if len(self._recvs) >= len(self._recv_slots):
                raise CommFull(f"KV-Runahead: {len(self._recvs) + 1} receives for {len(self._recv_slots)} slots")
            slot = self._recv_slots[self._slot_recvs % len(self._recv_slots)]
            self._slot_recvs += 1
            buf = slot_views(slot, [tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)], dtype,
                             "chain_recv")[0]
        self.bytes_received += buf.numel() * buf.element_size()
        self._recvs.append((src, dist.irecv(buf, src=src, group=group), buf))

    def _batch(self, recvs: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]], group) -> "Batch":
        """One ``batch_isend_irecv`` of ``recvs`` (source, buffer) and ``sends`` (destination, tensor) on
        ``group``: NCCL runs it as one group on the group's own communicator (one work); gloo as single
        operations (one work each)."""
        ops = [dist.P2POp(dist.irecv, t, src, group) for src, t in recvs]
        ops += [dist.P2POp(dist.isend, t, dst, group) for dst, t in sends]
        if not ops:
            raise ValueError("KV-Runahead: an empty batch")
        self.bytes_received += sum(t.numel() * t.element_size() for _, t in recvs)
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in sends)
        works = dist.batch_isend_irecv(ops)
        whats = [f"KV from {self.label} {src}{self.about}" for src, _ in recvs]
        whats += [f"KV to {self.label} {dst}{self.about} delivered" for dst, _ in sends]
        peers = [src for src, _ in recvs] + [dst for dst, _ in sends]
        batch = Batch(self, works, list(zip(peers, whats)) if len(works) == len(ops) else [])
        self._batches.append(batch)
        return batch

    def _wait_oldest(self, count: int) -> list[torch.Tensor]:
        """The buffers of the ``count`` oldest posted receives, in posting order, once arrived (NCCL: once
        the current stream has been made to wait for them)."""
        if count > len(self._recvs):
            raise RuntimeError(f"KV-Runahead: waiting for {count} receive(s), {len(self._recvs)} posted")
        recvs, self._recvs = self._recvs[:count], self._recvs[count:]
        for src, work, _ in recvs:
            _wait(work, f"{self.label} {src}", f"KV from {self.label} {src}", self.timeout_s, self._bounded)
        return [buf for _, _, buf in recvs]

    def _wait_send(self, work: dist.Work, tensor: torch.Tensor, dst: int) -> None:
        # gloo: bounded too, since a large send completes only once its peer receives it
        _wait(work, f"{self.label} {dst}", f"KV to {self.label} {dst}{self.about} delivered", self.timeout_s,
              self._bounded)

    def wait_sends(self) -> None:
        sends, self._sends = self._sends, []
        for send in sends:
            self._wait_send(*send)

    def end_step(self) -> None:
        """Wait for the step's sends and batches. Every posted receive must have been waited for by now:
        one still outstanding would be a later step's message taken early."""
        self.wait_sends()
        batches, self._batches = self._batches, []
        for batch in batches:
            batch.wait()
        if self._recvs:
            n, self._recvs = len(self._recvs), []
            raise RuntimeError(f"KV-Runahead: the step ended with {n} receive(s) still outstanding")

    def abort_step(self) -> None:
        """Forget the step's sends, receives and batches without waiting (the step raised: a peer may be
        gone, and waiting on it could block the error's way out)."""
        self._sends, self._recvs, self._batches = [], [], []


class Batch:
    """One ``batch_isend_irecv`` of a flow, its works kept here. ``wait``: NCCL, the current stream waits
    for it (no host sync; call it on every stream that needs it); gloo, the host waits, bounded by the
    flow's timeout, once."""

    def __init__(self, flow: _Flow, works: list, peers: list[tuple[int, str]]):
        self._flow, self._works, self._peers = flow, works, peers
        self._done = False

    def wait(self) -> None:
        f = self._flow
        if not f._bounded:
            for work in self._works:
                work.wait()
            return
        if self._done:
            return
        for i, work in enumerate(self._works):
            peer, what = self._peers[i] if self._peers else (-1, f"KV of a {f.label} batch")
            _wait(work, f"{f.label} {peer}", what, f.timeout_s, True)
        self._done = True


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
        send_slots: list[torch.Tensor] | None = None,
        recv_slots: list[torch.Tensor] | None = None,
    ) -> None:
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        # the link to each neighbour may use its own group (see ``for_ring``)
        self.prev_group = prev_group if prev_group is not None else group
        self.next_group = next_group if next_group is not None else group
        self.cpu_group = cpu_group
        super().__init__(timeout_s, not _is_nccl(self.prev_group), max_sends, send_slots, recv_slots)

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


def _wait(work: dist.Work, peer: str, what: str, timeout_s: float | None, bounded: bool) -> None:
    """Wait for ``what`` ("KV from chain rank 1") of ``peer`` ("chain rank 1"): bounded by ``timeout_s`` on
    gloo (``bounded``), with the error that says whether the peer died (closed its connection) or stalled."""
    t0 = time.monotonic()
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout_s)) if bounded else work.wait()
    except RuntimeError as e:  # gloo raises on timeout and on a closed connection
        waited = time.monotonic() - t0
        if timeout_s is None or waited < 0.9 * timeout_s:
            raise PeerLost(
                f"KV-Runahead: {peer} closed the connection after {waited:.1f} s "
                f"of waiting for {what} (its process died or failed): {e}") from e
        raise PeerTimeout(f"KV-Runahead: no {what} within {timeout_s} s; the peer stalled ({e})") from e
    if ok is False:
        raise PeerTimeout(f"KV-Runahead: no {what} within {timeout_s} s")


class RoundComm(_Flow):
    """TP layout: one flow of rounds (the KV head shards or the prefix gather, ``core/tp_order.py``) on a
    world-sized group of its own, driven by ``batch_isend_irecv`` only. A batched operation uses the
    group's own communicator, where an unbatched one would make a 2-rank communicator per pair: so a rank
    has one communicator per flow at any N. A round is one batch on every rank with traffic in it, and
    each message is sent and received in the same round on both sides; the flow's order is the caller's
    (``tp_layout.connector``), its buffers the caller's slots (``CommArena``)."""

    def __init__(self, rank: int, world: int, backend: str, timeout_s: float | None = None,
                 flow: str = "rounds") -> None:
        super().__init__(timeout_s, backend != "nccl", label="TP rank")
        self.rank, self.world, self.flow = rank, world, flow
        self.about = f" ({flow})"
        # collective: every rank makes the flows' groups in the same order
        self.group = dist.new_group(list(range(world)), backend=backend)

    def batch(self, recvs: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]]) -> Batch:
        """One round on this rank: receive each (source, buffer), send each (destination, tensor) (global
        ranks: the group spans vLLM's world). Waited for by the caller (``Batch.wait``) or at the step's end."""
        return self._batch(recvs, sends, self.group)

    def warm_up(self, device: torch.device) -> None:
        """One batch on every rank (send to rank + 1, receive from rank - 1, around), so the group's
        communicator exists before the first request: the first batch on a group must include every rank
        (torch's ``batch_isend_irecv`` note)."""
        if self.world > 1:
            buf = torch.zeros(1, device=device)
            self.batch([((self.rank - 1) % self.world, buf)], [((self.rank + 1) % self.world, torch.ones(1, device=device))])
            self.end_step()
        self.bytes_sent = self.bytes_received = 0


def slot_views(slot: torch.Tensor, shapes, dtype: torch.dtype, name: str = "slot") -> list[torch.Tensor]:
    """Consecutive tensors of ``shapes`` and ``dtype`` in one byte buffer (a slot of ``CommArena``)."""
    out, at, size = [], 0, torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        n = math.prod(shape) * size
        if at + n > slot.numel():
            need = sum(math.prod(s) for s in shapes) * size
            raise CommFull(f"KV-Runahead: a step's {name} messages need {need} bytes; the slot holds {slot.numel()}")
        out.append(slot[at:at + n].view(dtype).view(shape))
        at += n
    return out


class CommArena:
    """A TP-layout rank's comm buffers, allocated once (``tp_order.comm_buffer_bytes``'s slots: name ->
    (count, bytes of one)); every message of a step is a view into one of them, so a step allocates nothing
    for its traffic and the KV budget leaves out exactly ``nbytes``. Zero-filled: on CPU vLLM sizes the KV
    from the process's RSS, which then holds the arena too."""

    def __init__(self, slots: dict[str, tuple[int, int]], device: torch.device | str = "cpu"):
        self.slots = {name: [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
                      for name, (count, nbytes) in slots.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for ts in self.slots.values() for t in ts)

    def buffers(self, name: str) -> list[torch.Tensor]:
        """The slots of ``name`` (empty: none)."""
        return self.slots.get(name, [])

    def views(self, name: str, index: int, shapes, dtype: torch.dtype) -> list[torch.Tensor]:
        """Tensors of ``shapes`` laid out in slot ``index`` of ``name``."""
        ring = self.slots.get(name, [])
        if not 0 <= index < len(ring):
            raise CommFull(f"KV-Runahead: {name} slot {index} of {len(ring)}")
        return slot_views(ring[index], shapes, dtype, name)


def _is_nccl(group: dist.ProcessGroup | None) -> bool:
    try:
        return dist.get_backend(group) == "nccl"
    except Exception:  # noqa: BLE001 - not initialized / unknown group
        return False
