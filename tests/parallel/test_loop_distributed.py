"""The training loop under several ranks (as under torchrun) reproduces the single-process run.

Real data path (sentencepiece + .bin/.idx), adaptive aux coefficients on, validation, metrics.jsonl:
the loop on 2 gloo ranks with tp=2 and with pp=2 logs the same per-step losses, grad norms, drop
rates and coefficients as one process, and only rank 0 writes metrics. Tolerance: 1e-5 relative
(fp32, reduction order; see tests/parallel/helpers.py).

With --log-params-norm and --log-num-zeros-in-grad on, the logged parameter norm (~17.9) agrees to
1e-6 relative (parameters differ by a few ulp after each step; observed: equal to ~1e-7) and the
zero count exactly: the zeros are structural (the embedding rows of the token ids absent from a
step's batch: ~15700 elements of 512 x 32), the same in every layout, and every replicated element
(norm weights, routers under tp2) must be counted once.
"""

from __future__ import annotations

import json

import pytest

from megatron_moe.testing import run_distributed
from megatron_moe.training.trainer import train
from tests.builders import loop_config

RTOL = 1e-5
PARAMS_NORM_RTOL = 1e-6


def _records(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _config(corpus, run_dir, tp: int = 1, pp: int = 1):
    cfg = loop_config(corpus, run_dir, tp, pp)
    cfg.logging.log_params_norm = cfg.logging.log_num_zeros_in_grad = True
    return cfg


def _loop_body(rank, world, corpus, root):
    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        run_dir = root / f"tp{tp}pp{pp}"
        out[(tp, pp)] = train(_config(corpus, run_dir, tp, pp))
    return out


@pytest.mark.slow
def test_loop_on_two_ranks_matches_single_process(loop_corpus, tmp_path):
    corpus = loop_corpus
    ref_summary = train(_config(corpus, tmp_path / "single"))
    ref = _records(tmp_path / "single")
    results = run_distributed(_loop_body, 2, (corpus, tmp_path), timeout=300)
    for layout in ((2, 1), (1, 2)):
        run_dir = tmp_path / f"tp{layout[0]}pp{layout[1]}"
        got = _records(run_dir)
        assert len(got) == len(ref), f"{layout}: rank 0 alone writes metrics ({len(got)} vs {len(ref)} lines)"
        for a, b in zip(got, ref, strict=True):
            assert a["step"] == b["step"]
            for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "valid_loss"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=RTOL), (layout, a["step"], key)
            if "lm_loss" in b:
                assert a["params_norm"] == pytest.approx(b["params_norm"], rel=PARAMS_NORM_RTOL), (layout, a["step"])
                assert a["num_zeros_in_grad"] == b["num_zeros_in_grad"] > 0, (layout, a["step"])
            for la, lb in zip(a.get("moe", []), b.get("moe", []), strict=True):
                for key in ("aux_coeff", "drop_rate", "aux_loss"):
                    assert la[key] == pytest.approx(lb[key], rel=RTOL, abs=1e-9), (layout, a["step"], key)
        for rank_result in results:
            last = rank_result[layout]["valid"][-1]["loss"]
            assert last == pytest.approx(ref_summary["valid"][-1]["loss"], rel=RTOL), layout
