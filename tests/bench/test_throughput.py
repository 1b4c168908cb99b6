"""bench/throughput.py's rows that compare implementations: each starts from our weights and checks it
computes what ours does before it is timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import throughput  # noqa: E402

from megatron_moe.config import parse_args  # noqa: E402
from megatron_moe.model.moe import MoELayer  # noqa: E402
from megatron_moe.parallel.engine import init_distributed_from_env  # noqa: E402

SMALL = ["--training.device", "cpu", "--lr", "1e-4", "--min-lr", "1e-5"]


@pytest.fixture(autouse=True)
def single_process_group():
    """The bench runs in a 1-rank process group (its bf16 rows need one); the tests after these must not
    inherit it (a dry run refuses to start inside an initialised torch.distributed)."""
    owns = not dist.is_initialized() and init_distributed_from_env("cpu", single_process=True)
    yield
    if owns and dist.is_initialized():
        dist.destroy_process_group()


def test_torchtitan_row_holds_our_weights_and_trains():
    """torchtitan's MoE layer in our model (where torchtitan imports): the row's own check (each layer's
    output against ours on the same input, bf16-rounded experts) passes, and one engine step trains."""
    pytest.importorskip("torchtitan.models.common.moe", reason="torchtitan is not installed (optional)")
    cfg, _ = parse_args(throughput.CPU_SHAPES["small"] + SMALL)
    ours = throughput._ours("ours", cfg, torch.device("cpu"))
    row = throughput._torchtitan_row(cfg, ours.module[0], torch.device("cpu"))
    assert row.step is not None, row.note
    (model,) = row.module
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert sum(isinstance(m, throughput._TorchtitanMoE) for m in model.modules()) == cfg.model.num_layers
    before = [p.detach().clone() for p in model.parameters()]
    row.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_a_row_that_runs_out_of_gpu_memory_is_reported_and_the_others_still_run(monkeypatch):
    """On a GPU every row of a call is resident at once; a row that does not fit any more is dropped with a
    note naming the --rows that benches it, instead of ending the run (simulated: its step raises CUDA's OOM)."""
    cfg, _ = parse_args(throughput.CPU_SHAPES["small"] + SMALL)
    device = torch.device("cpu")

    def too_big() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def rows(cfg, device, only):
        return [throughput._ours("ours", cfg, device), throughput.Row("hf-grouped", too_big, torch.nn.Linear(2, 2))]

    monkeypatch.setattr(throughput, "build_rows", rows)
    results = throughput.run(cfg, device, warmup=1, steps=1, rounds=1, only=None, peak_tflops=None)
    assert results["ours"]["available"] and results["ours"]["tokens_per_sec"] > 0
    assert not results["hf-grouped"]["available"]
    assert "--rows hf-grouped" in results["hf-grouped"]["note"]


def test_bench_command_writes_its_table_and_json(tmp_path, capsys):
    """The bench end to end on a tiny config: Hugging Face's Mixtral holds our weights (its logits check
    passes), every requested row is timed, and the JSON carries the ratios the table prints."""
    config = tmp_path / "tiny.toml"
    config.write_text("""
[model]
hidden_size = 64
num_layers = 2
num_attention_heads = 4
num_query_groups = 2
vocab_size = 256
[moe]
num_experts = 4
topk = 2
expert_ffn_hidden_size = 64
[data]
seq_length = 32
[training]
micro_batch_size = 2
global_batch_size = 2
""")
    out = tmp_path / "bench.json"
    assert throughput.main(["--config", str(config), "--rows", "hf-grouped", "dense", "expert-loop",
                            "--warmup", "1", "--steps", "1", "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (shape,) = report["shapes"].values()
    for name in ("ours", "hf-grouped", "dense", "expert-loop"):
        entry = shape["results"][name]
        assert entry["available"] and entry["tokens_per_sec"] > 0 and entry["spread"] >= 0, name
    assert "logits equal to ours" in shape["results"]["hf-grouped"]["note"]
    assert set(shape["ratios"]) == {"ours / hf-grouped", "MoE / dense (equal active)", "grouped GEMM / expert loop"}
    gemm = shape["gemm"]  # the experts' grouped GEMM vs one dense GEMM of the same FLOPs
    assert (gemm["rows"], gemm["experts"], gemm["hidden"], gemm["ffn"]) == (2 * 32 * 2, 4, 64, 64)
    assert gemm["padded_rows"] == gemm["rows"]  # no row alignment on CPU
    assert gemm["grouped_tflops"] > 0 and gemm["ratio"] == pytest.approx(gemm["grouped_tflops"] / gemm["dense_tflops"])
    printed = capsys.readouterr().out
    assert "ours / hf-grouped" in printed and "grouped GEMM / dense GEMM" in printed


def test_rows_a_model_has_no_counterpart_for_are_notes_not_failures():
    """A Qwen3-MoE-like config (query/key norms, a shared expert, top-4) has no Mixtral and no SparseMixer-v2
    variant: those rows say why instead of ending the run; ours still runs, as does the sigmoid-routing model's."""
    argv = throughput.CPU_SHAPES["small"] + SMALL + ["--qk-layernorm", "--moe-router-topk", "4",
                                                      "--moe-shared-expert-intermediate-size", "64"]
    cfg, _ = parse_args(argv)
    rows = {r.name: r for r in throughput.build_rows(cfg, torch.device("cpu"), {"ours", "hf-grouped", "sparsemixer"})}
    assert rows["ours"].step is not None
    assert rows["hf-grouped"].step is None and "not a Mixtral model: moe.shared_expert" in rows["hf-grouped"].note
    assert rows["sparsemixer"].step is None and "routes 2 experts, this config 4" in rows["sparsemixer"].note
    cfg, _ = parse_args(throughput.CPU_SHAPES["small"] + SMALL + ["--moe-router-score-function", "sigmoid",
                                                                   "--moe-router-enable-expert-bias"])
    rows = {r.name: r for r in throughput.build_rows(cfg, torch.device("cpu"), {"ours", "hf-grouped", "sparsemixer"})}
    assert "not a Mixtral model: moe.score_function" in rows["hf-grouped"].note
    assert rows["sparsemixer"].step is not None  # the same model with GRIN's router (softmax, no bias)
