"""The connector issues exactly ``ring_order.step_order``'s operations, with ChainComm doing the
moving (a recording ChainComm stand-in; no engine, no process group)."""
import numpy as np
import pytest
import torch

from vllm_kvrunahead.copies.connector import KVRunaheadConnector, RunaheadMeta
from vllm_kvrunahead.core.ring_order import POST_RECV, PREFIX, SEND, UPFRONT, WAIT_RECV, Role, step_order
from vllm_kvrunahead.core.stats import RunaheadStats
from vllm_kvrunahead.transport.chain_hooks import ChainHooks
from vllm_kvrunahead.transport.profiling import StepProfiler

LAYERS, BLOCKS, BLOCK = 3, 8, (2, 4)   # 3 layers of 8 blocks, each block [2, 4]


class RecordingComm:
    def __init__(self):
        self.log, self._posted = [], []

    def send_copy(self, cache, blocks):
        return cache.index_select(0, blocks)

    def post_send(self, tensor):
        self.log.append((SEND, tuple(tensor.shape), tensor.clone()))

    def post_recv(self, shape, dtype, device):
        self._posted.append(torch.full(shape, 100.0 + len(self.log), dtype=dtype))
        self.log.append((POST_RECV, tuple(shape), None))

    def wait_recv(self):
        buf = self._posted.pop(0)
        self.log.append((WAIT_RECV, tuple(buf.shape), buf))
        return buf

    def end_step(self):
        assert not self._posted, "a receive is outstanding at the end of the step"

    def abort_step(self):
        self._posted = []


def connector(meta, send_on_entry):
    """vLLM's connector base needs an engine config; the chain's hooks are the connector's whole step."""
    c = object.__new__(KVRunaheadConnector)
    c.comm, c.stats = RecordingComm(), RunaheadStats()
    c.chain = h = ChainHooks(c.comm, c.stats, BLOCKS, send_on_entry=send_on_entry)
    h.order = c.order = [f"layers.{i}.attn" for i in range(LAYERS)]
    h.kv_caches = c.kv_caches = {name: torch.full((BLOCKS, *BLOCK), float(i)) for i, name in enumerate(c.order)}
    h.block_shape, h.dtype, h.device, h.per_block = BLOCK, torch.float32, torch.device("cpu"), 1
    h.profiler = StepProfiler(h.device, False)
    c._get_connector_metadata = lambda: meta
    return c


def run_step(c):
    c.start_load_kv(None)
    for name in c.order:
        c.wait_for_layer_load(name)
        c.save_kv_layer(name, c.kv_caches[name], None)
    c.wait_for_save()


ids = lambda *b: np.array(b, np.int64)  # noqa: E731
HEAD = dict(recv=ids(4, 5), send_prefix=ids(0, 1), upfront_send=ids(2))
FIRST = dict(recv=ids(0, 1), send=ids(0, 1, 2, 3), upfront_recv=ids(2))
MIDDLE = dict(recv=ids(0, 1, 2, 3), send=ids(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("send_on_entry", [False, True])
@pytest.mark.parametrize("traffic", [HEAD, FIRST, MIDDLE, dict(send=ids(0, 1))],
                         ids=["head", "first", "middle", "chain-first"])
def test_a_step_issues_the_ring_order(traffic, send_on_entry):
    c = connector(RunaheadMeta(**traffic), send_on_entry)
    run_step(c)
    order = step_order(Role(LAYERS, send_on_entry=send_on_entry, **{k: True for k in traffic}))
    want = list(order.start) + [op for layer in range(LAYERS) for op in order.entry[layer] + order.exit[layer]]
    assert [kind for kind, _, _ in c.comm.log] == [op.kind for op in want]
    for (kind, shape, data), op in zip(c.comm.log, want):
        n = len(traffic["upfront_send" if op.kind == SEND else "upfront_recv"]) if op.msg == UPFRONT else len(
            traffic["send_prefix" if op.msg == PREFIX else "send" if op.kind == SEND else "recv"])
        assert shape == ((LAYERS, n, *BLOCK) if op.msg == UPFRONT else (n, *BLOCK)), op
        if op.msg == PREFIX:   # the head's cached prefix, from the layer it is sent for
            assert torch.all(data == float(op.layer)), op
    layer_recv = len(traffic.get("recv", ()))
    up = len(traffic.get("upfront_send", ())) + len(traffic.get("upfront_recv", ()))
    sends = len(traffic.get("send", ())) + len(traffic.get("send_prefix", ()))
    assert c.stats.steps == 1
    assert c.stats.blocks_received == LAYERS * layer_recv + (LAYERS * up if "upfront_recv" in traffic else 0)
    assert c.stats.blocks_sent == LAYERS * sends + (LAYERS * up if "upfront_send" in traffic else 0)
    assert c.stats.layers_sent == (LAYERS if sends else 0)
    assert c.stats.layers_sent_on_entry == (LAYERS if send_on_entry and "send" in traffic else 0)


def test_received_kv_lands_in_the_layer_it_was_sent_for():
    c = connector(RunaheadMeta(**MIDDLE), send_on_entry=True)
    run_step(c)
    waits = [data for kind, _, data in c.comm.log if kind == WAIT_RECV]
    sends = [data for kind, _, data in c.comm.log if kind == SEND]
    for layer, (name, got, sent) in enumerate(zip(c.order, waits, sends)):
        assert torch.equal(c.kv_caches[name][:4], got)      # the prefix blocks, as received
        assert torch.equal(sent[:4], got)                   # ... and passed on with own blocks 4, 5
        assert torch.all(sent[4:] == float(layer))


def test_a_step_without_traffic_issues_nothing():
    c = connector(RunaheadMeta(), send_on_entry=False)
    run_step(c)
    assert c.comm.log == [] and c.stats == RunaheadStats()


def test_a_model_with_fewer_attention_layers_than_caches_is_refused():
    c = connector(RunaheadMeta(**MIDDLE), send_on_entry=False)
    c.start_load_kv(None)
    for name in c.order[:-1]:
        c.wait_for_layer_load(name)
        c.save_kv_layer(name, c.kv_caches[name], None)
    with pytest.raises(RuntimeError, match="1 layer\\(s\\) of prefix KV were never consumed"):
        c.wait_for_save()
