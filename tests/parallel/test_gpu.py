"""GPU-only checks of the hot path (skipped without CUDA): no host sync inside a training step, the
grouped GEMM with its automatic row padding, and flash attention for the attention core."""

from __future__ import annotations

import pytest
import torch

from tests.builders import tiny_config
from tests.parallel.helpers import make_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def single_rank_group():
    import torch.distributed as dist

    from megatron_moe.parallel.engine import init_distributed_from_env

    owns = not dist.is_initialized() and init_distributed_from_env("cuda", single_process=True)
    yield
    if owns:
        dist.destroy_process_group()


def _gpu_config(**settings):
    # Sizes the grouped GEMM accepts on CUDA (multiples of 8); bf16 with fp32 master weights.
    cfg = tiny_config(hidden_size=64, ffn_hidden_size=128, expert_ffn_hidden_size=64, **settings)
    cfg.training.bf16, cfg.training.device = True, "cuda"
    return cfg


def test_training_step_does_not_wait_for_the_device(single_rank_group):
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.optim import build_optimizer

    cfg = _gpu_config(router="sparsemixer")
    engine = ParallelEngine(cfg, device=torch.device("cuda"))
    module = engine.build_model()
    optimizer = build_optimizer(module, cfg.optimizer)
    batches = [{k: v.cuda() for k, v in b.items()} for b in make_batches()]
    for _ in range(2):  # warm-up: lazy initialisation may sync
        engine.train_step(batches, optimizer, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = engine.train_step(batches, optimizer, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.lm_loss).item()


def test_grouped_gemm_with_automatic_padding_matches_fp32_cpu():
    from megatron_moe.config import MoEConfig
    from megatron_moe.model.moe import MoELayer, expert_row_alignment

    layer = MoELayer(64, 64, MoEConfig(num_experts=8, topk=2)).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(37, 64)
    reference = layer(x)
    gpu = layer.cuda().bfloat16()
    assert expert_row_alignment(0, x.cuda().bfloat16()) == 8
    out = gpu(x.cuda().bfloat16()).float().cpu()
    torch.testing.assert_close(out, reference, rtol=5e-2, atol=5e-2)


def test_attention_core_runs_on_the_flash_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_moe.model.transformer import CoreAttention, rope_tables

    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)  # grouped-query: 2 KV heads
    cos, sin = (t.cuda() for t in rope_tables(128, 64, 10000.0))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = CoreAttention()(q, kv, kv, cos, sin)
    assert out.shape == (2, 128, 8 * 64)


def test_latent_attention_core_runs_on_the_flash_backend():
    """Latent attention's value heads (128) are narrower than its q/k heads (128 + 64): padded with zeros on
    CUDA, the core still runs on the flash kernel, and equals the unpadded math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_moe.model.transformer import CoreAttention, rope_tables

    q, k = (torch.randn(2, 128, 4, 192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 128, 4, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in rope_tables(128, 64, 10000.0))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = CoreAttention()(q, k, v, cos, sin)
    unpadded = CoreAttention()
    unpadded.pad_values = False
    with sdpa_kernel(SDPBackend.MATH):
        ref = unpadded(q, k, v, cos, sin)
    assert out.shape == (2, 128, 4 * 128)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
