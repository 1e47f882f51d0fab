"""The TP layout's guest config (issue 33): the guest never captures a CUDA graph lazily.

On GPUs vLLM's config carries FULL_AND_PIECEWISE with capture sizes up to 512. A guest that kept it got
PIECEWISE from its runner's dispatcher for every step of up to 512 tokens, captured on that size's first
step and returned outputs whose kernels never ran (one H100, ``../shared/reviews/r1-evidence-2026-12-07.md``).
The CPU platform resolves vLLM's own mode to NONE, so here the GPU's resolved settings are set on a real
``VllmConfig`` and vLLM's own dispatcher is asked, as the guest's V1 runner builds and asks it.
"""
from vllm.config import CompilationMode, CUDAGraphMode, ParallelConfig, VllmConfig
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

from vllm_kvrunahead.vllm_side.guest import guest_config

SIZES = (1, 32, 300, 304, 512, 600, 2048, 8192)


def gpu_default_config() -> VllmConfig:
    """A TP=2 config with what vLLM 0.26.0 resolves on a GPU under its defaults."""
    cfg = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))
    cc = cfg.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.splitting_ops = list(cc._attention_ops)
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cc.cudagraph_capture_sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
    cc.max_cudagraph_capture_size = 512
    return cfg


def dispatched(cfg: VllmConfig) -> dict[int, CUDAGraphMode]:
    """The runtime mode each step size gets, as a V1 runner's dispatcher gives it once its keys are set
    (``GPUModelRunner._check_and_update_cudagraph_mode``; NONE resolves to NONE)."""
    d = CudagraphDispatcher(cfg)
    d.initialize_cudagraph_keys(cfg.compilation_config.cudagraph_mode, 1)
    return {n: d.dispatch(num_tokens=n)[0] for n in SIZES}


def test_vllm_default_sends_steps_up_to_the_capture_size_to_graphs():
    """The hazard, reproduced with vLLM's dispatcher: what the guest got before the fix."""
    got = dispatched(gpu_default_config())
    assert {n for n, m in got.items() if m != CUDAGraphMode.NONE} == {1, 32, 300, 304, 512}
    assert got[32] == CUDAGraphMode.PIECEWISE


def test_guest_config_has_no_cuda_graph_path_and_keeps_compile():
    vllm_cfg = gpu_default_config()
    cfg = guest_config(vllm_cfg)
    cc = cfg.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.NONE
    # no piecewise wrappers around its compiled pieces, no FULL wrapper around its model
    assert not cc.cudagraph_mode.has_piecewise_cudagraphs() and not cc.cudagraph_mode.has_full_cudagraphs()
    assert set(dispatched(cfg).values()) == {CUDAGraphMode.NONE}
    assert cc.mode == CompilationMode.VLLM_COMPILE  # torch.compile stays
    assert cfg.parallel_config.tensor_parallel_size == 1 and cfg.parallel_config.world_size == 1
    # vLLM's own model keeps its graphs
    assert vllm_cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert vllm_cfg.parallel_config.tensor_parallel_size == 2
