"""An upcycled checkpoint loads into a 2-rank tensor-parallel layout and computes the dense HF logits."""

from __future__ import annotations

import pytest
import torch

# Only what the spawned ranks need is imported at module level (each rank re-imports this module).


def _tp_logits(rank: int, world_size: int, ckpt_dir: str, x: torch.Tensor):
    from torch.distributed.tensor import DTensor

    from megatron_moe.convert.native import read_config
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.checkpoint import load_checkpoint

    ckpt, cfg, _ = read_config(ckpt_dir)
    cfg.parallel.tensor_model_parallel_size = world_size
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 2
    engine = ParallelEngine(cfg)
    (part,) = engine.build_model(seed=99)  # random init, then overwritten by the checkpoint
    state = part.state_dict()
    assert any(isinstance(v, DTensor) for v in state.values()), "model is not tensor-parallel"
    load_checkpoint(ckpt, {"model": state})
    part.eval()
    with torch.no_grad():
        logits = part(x)
    full = logits.full_tensor() if isinstance(logits, DTensor) else logits
    # A numpy array pickles by value: a torch tensor would travel through shared memory that may be
    # gone once this rank has exited.
    return full.detach().numpy().copy()


@pytest.mark.slow
def test_upcycled_checkpoint_in_tp2_layout_matches_dense(tmp_path, capsys):
    import upcycle_checkpoint
    from megatron_moe.testing import run_distributed
    from tests.convert.helpers import make_hf, tokens

    hf = make_hf(tmp_path / "hf")
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "hf"), "--input-format", "hf", "--num-experts", "4",
                                  "--output", str(tmp_path / "moe")])
    assert rc == 0, capsys.readouterr().err
    x = tokens(seq=16)
    with torch.no_grad():
        ref = hf(x).logits
    results = run_distributed(_tp_logits, world_size=2, args=(str(tmp_path / "moe"), x))
    for logits in results:
        torch.testing.assert_close(torch.from_numpy(logits), ref, atol=1e-5, rtol=0)
