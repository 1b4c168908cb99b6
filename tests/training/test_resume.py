"""Checkpointed runs: exact resume, resharded load, eval-only, SIGTERM, non-finite losses, bad inputs.

Real data path (sentencepiece + .bin/.idx) and the real loop (`train`). Bitwise equality where the
layout is the same (single process, and 2x2 tp x pp); across layouts the tolerance is 1e-5 relative
(fp32 sums in a different order: measured differences are ~1e-7, see tests/parallel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_moe.testing import run_distributed
from megatron_moe.training.checkpoint import CheckpointError, list_checkpoints, read_meta, resolve_checkpoint
from megatron_moe.training.trainer import train
from tests.builders import loop_config

ROOT = Path(__file__).parents[2]


def cfg_for(corpus, run_dir, tp=1, pp=1, router="sparsemixer", iters=6, mtp=0):
    cfg = loop_config(corpus, run_dir, tp, pp)
    cfg.moe.router = router
    cfg.model.mtp_num_layers = mtp
    cfg.training.train_iters, cfg.training.eval_interval = iters, 3
    cfg.checkpoint.save_interval = 3
    return cfg


def losses(run_dir) -> dict[int, tuple]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "lm_loss" in r:
            out[r["step"]] = (r["lm_loss"], r["aux_loss"], r["grad_norm"], [m["aux_coeff"] for m in r["moe"]],
                              r.get("mtp_loss"))
    return out


@pytest.mark.parametrize("variant", ["fp32", "bf16", "expert-bias"])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(loop_corpus, tmp_path, variant):
    """bf16: the fp32 master weights are what is checkpointed; expert-bias: DeepSeek-V3's architecture, whose
    expert biases (moved by 0.05 a step, so that routing depends on them) are checkpointed with the model, with
    its multi-latent attention, YaRN and a depth of multi-token prediction."""
    corpus = loop_corpus

    def config(run_dir):
        cfg = cfg_for(corpus, run_dir, router="topk" if variant == "expert-bias" else "sparsemixer")
        cfg.training.bf16 = variant == "bf16"
        if variant == "expert-bias":
            cfg.moe.score_function, cfg.moe.expert_bias, cfg.moe.expert_bias_update_rate = "sigmoid", True, 0.05
            cfg.model = dataclasses.replace(
                cfg.model, multi_latent_attention=True, num_query_groups=0, q_lora_rank=16, kv_lora_rank=12,
                qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, qk_layernorm=True, rope_scaling="yarn",
                rope_scaling_factor=4.0, rope_yarn_original_max_position=8, rope_yarn_mscale_all_dim=1.0,
                mtp_num_layers=1)
        return cfg

    train(config(tmp_path / "full"))
    cfg = config(tmp_path / "parts")
    cfg.training.exit_interval = 3
    summary = train(cfg)
    assert summary["stopped_at"] == 3 and [p.name for p in list_checkpoints(tmp_path / "parts")] == ["iter_0000003"]
    cfg = config(tmp_path / "parts")
    cfg.checkpoint.load = str(tmp_path / "parts")
    train(cfg)
    full, parts = losses(tmp_path / "full"), losses(tmp_path / "parts")
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # SparseMixer-v2 samples too: the generators are checkpointed
        assert parts[step] == full[step], step
    assert (full[6][-1] is not None) == (variant == "expert-bias")  # the multi-token prediction loss is logged
    meta = read_meta(resolve_checkpoint(tmp_path / "parts"))
    assert meta["step"] == 6 and meta["contents"] == ["model", "optimizer", "train_state"]
    if variant == "expert-bias":  # saved with the model: nonzero after 3 steps, the same after 6 either way
        from megatron_moe.convert.native import load_model

        def biases(ckpt):
            return [layer.feed_forward.router.expert_bias for layer in load_model(ckpt)[0].layers.values()]

        assert all(b.abs().max() > 0 for b in biases(tmp_path / "parts" / "iter_0000003"))
        for a, b in zip(biases(tmp_path / "parts"), biases(tmp_path / "full"), strict=True):
            assert torch.equal(a, b)


def _layout_body(rank, world, corpus, root, mode):
    cfg = cfg_for(corpus, root / mode, tp=2, pp=2, router="topk", mtp=1)
    if mode == "parts":
        cfg.training.exit_interval = 3
        train(cfg)
        cfg = cfg_for(corpus, root / mode, tp=2, pp=2, router="topk", mtp=1)
        cfg.checkpoint.load = str(root / mode)
    elif mode == "from_single":
        cfg.checkpoint.load = str(root / "single_parts")
    train(cfg)
    return rank


@pytest.mark.slow
def test_resume_in_2x2_layout_and_resharded_loads(loop_corpus, tmp_path):
    """With a depth of multi-token prediction: the last pipeline stage's copy of the embedding is saved under the
    embedding's name (once) and loaded into both stages."""
    corpus = loop_corpus
    # Uninterrupted and interrupted+resumed runs in tp=2 x pp=2 (4 ranks): identical losses.
    run_distributed(_layout_body, 4, (corpus, tmp_path, "full"), timeout=300)
    run_distributed(_layout_body, 4, (corpus, tmp_path, "parts"), timeout=300)
    full, parts = losses(tmp_path / "full"), losses(tmp_path / "parts")
    for step in (4, 5, 6):
        assert parts[step] == full[step], step
    assert full[6][4] is not None  # the multi-token prediction loss, from the last stage
    # Saved with tp=2, pp=2, resumed in one process: the continuation matches the 2x2 run.
    single = cfg_for(corpus, tmp_path / "from_2x2", router="topk", mtp=1)
    single.checkpoint.load = str(resolve_checkpoint(tmp_path / "full").parent / "iter_0000003")
    train(single)
    resharded = losses(tmp_path / "from_2x2")
    # ...and the reverse: saved by one process, resumed with tp=2, pp=2.
    first = cfg_for(corpus, tmp_path / "single_parts", router="topk", mtp=1)
    first.training.exit_interval = 3
    train(first)
    run_distributed(_layout_body, 4, (corpus, tmp_path, "from_single"), timeout=300)
    reverse = losses(tmp_path / "from_single")
    for step in (4, 5, 6):
        for got in (resharded[step], reverse[step]):
            for a, b in zip(got[:3] + got[4:], full[step][:3] + full[step][4:], strict=True):
                assert a == pytest.approx(b, rel=1e-5), step
            assert got[3] == pytest.approx(full[step][3], rel=1e-5)


def test_eval_only_writes_eval_json(loop_corpus, tmp_path):
    corpus = loop_corpus
    train(cfg_for(corpus, tmp_path / "run", iters=3))
    cfg = cfg_for(corpus, tmp_path / "eval")
    cfg.checkpoint.load = str(tmp_path / "run")
    out = train(cfg, eval_only=True)["eval"]
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["step"] == 3 and written["loss"] == pytest.approx(out["loss"])
    assert written["ppl"] == pytest.approx(2.718281828 ** written["loss"], rel=1e-6)
    assert len(written["expert_load"]) == 4 and all(abs(sum(layer) - 1) < 1e-5 for layer in written["expert_load"])
    assert len(written["expert_similarity"]) == 4
    valid = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_valid = [r for r in valid if "valid_loss" in r][-1]
    assert written["loss"] == pytest.approx(last_valid["valid_loss"], rel=1e-6)  # the same evaluation code


def test_eval_report_that_cannot_be_written_fails_naming_it_after_printing_the_results(loop_corpus, tmp_path,
                                                                                       capsys):
    corpus = loop_corpus
    train(cfg_for(corpus, tmp_path / "run", iters=2))
    cfg = cfg_for(corpus, tmp_path / "eval")
    cfg.checkpoint.load = str(tmp_path / "run")
    (tmp_path / "eval" / "eval.json").mkdir(parents=True)  # in the way of the report
    with pytest.raises(CheckpointError, match=r"cannot write the evaluation report .*eval/eval.json.*--save"):
        train(cfg, eval_only=True)
    assert "eval | " in capsys.readouterr().out  # the results were printed first


def test_save_directory_that_cannot_be_made_is_a_clear_error(loop_corpus, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = cfg_for(loop_corpus, tmp_path / "a_file" / "run", iters=1)  # a file where the directory would go
    with pytest.raises(CheckpointError, match=r"--save .*a_file/run: cannot create this directory"):
        train(cfg)


def test_sigterm_checkpoints_at_step_boundary_and_exits_cleanly(loop_corpus, tmp_path):
    corpus = loop_corpus
    cfg = cfg_for(corpus, tmp_path / "run", router="topk", iters=400)
    cfg.training.eval_interval = 0
    cfg.checkpoint.save_interval = 0
    toml = tmp_path / "c.toml"
    lines = []
    for group, values in cfg.to_dict().items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    toml.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_moe.py"), "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    assert "received SIGTERM" in output and "saved checkpoint" in output
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert 0 < read_meta(ckpt)["step"] < 400
    resume = cfg_for(corpus, tmp_path / "run", router="topk", iters=read_meta(ckpt)["step"] + 1)
    resume.checkpoint.load = str(tmp_path / "run")
    train(resume)  # the checkpoint loads and training continues


def test_nonfinite_loss_stops_without_poisoned_checkpoint_or_skips(loop_corpus, tmp_path, monkeypatch):
    corpus = loop_corpus
    import megatron_moe.parallel.engine as engine_mod

    real = engine_mod.lm_loss_from_target
    calls = {"n": 0}

    def poisoned(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if 5 <= calls["n"] <= 6 else loss  # step 3 (2 micro-batches/step)

    monkeypatch.setattr(engine_mod, "lm_loss_from_target", poisoned)
    cfg = cfg_for(corpus, tmp_path / "stop", router="topk")
    cfg.training.eval_interval, cfg.checkpoint.save_interval = 0, 1
    with pytest.raises(FloatingPointError, match=r"step 3.*\n.*MoE layer 0"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "stop")] == ["iter_0000001", "iter_0000002"]

    calls["n"] = 0
    cfg = cfg_for(corpus, tmp_path / "skip", router="topk")
    cfg.training.eval_interval, cfg.training.nonfinite_loss = 0, "skip"
    train(cfg)
    logged = losses(tmp_path / "skip")
    assert 3 not in logged and sorted(logged) == [1, 2, 4, 5, 6]


def test_bad_inputs_give_clear_errors(loop_corpus, tmp_path):
    corpus = loop_corpus
    cfg = cfg_for(corpus, tmp_path / "a", iters=3)
    cfg.data.data_path = [str(tmp_path / "missing_prefix")]
    with pytest.raises(FileNotFoundError, match="missing_prefix"):
        train(cfg)
    train(cfg_for(corpus, tmp_path / "run", iters=3))
    cfg = cfg_for(corpus, tmp_path / "b")
    cfg.checkpoint.load = str(tmp_path / "run")
    cfg.model.hidden_size, cfg.moe.num_experts = 64, 8
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 32, config 64.*moe.num_experts"):
        train(cfg)
    cfg = cfg_for(corpus, tmp_path / "c")
    cfg.model.vocab_size = 64  # smaller than the tokenizer's vocabulary
    with pytest.raises(ValueError, match="model.vocab_size = 64 is smaller than the tokenizer"):
        train(cfg)
    ckpt = resolve_checkpoint(tmp_path / "run")
    os.remove(next(ckpt.glob("*.distcp")))
    cfg = cfg_for(corpus, tmp_path / "d")
    cfg.checkpoint.load = str(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"is incomplete: __0_0\.distcp is missing"):
        train(cfg)
    cfg = cfg_for(corpus, tmp_path / "e")
    with pytest.raises(ValueError, match="--eval-only needs"):
        train(cfg, eval_only=True)


def test_resuming_with_another_tokenizer_is_refused(loop_corpus, tmp_path):
    corpus = loop_corpus
    from megatron_moe.data.tokenizer import train_sentencepiece

    train(cfg_for(corpus, tmp_path / "run", iters=3))
    text = tmp_path / "other.txt"
    text.write_text("completely different words for another tokenizer\n" * 200)
    other = train_sentencepiece([str(text)], str(tmp_path / "other"), 300)
    cfg = cfg_for(corpus, tmp_path / "run", iters=4)
    cfg.checkpoint.load, cfg.data.tokenizer_model = str(tmp_path / "run"), other
    with pytest.raises(CheckpointError, match="is not the one checkpoint .* was trained with"):
        train(cfg)


def test_a_save_directory_belongs_to_one_run(loop_corpus, tmp_path):
    from megatron_moe.training.checkpointing import _lock

    corpus = loop_corpus
    train(cfg_for(corpus, tmp_path / "run", iters=3))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    # A new run (no --load) into a directory holding another run's checkpoints: refused, nothing touched.
    with pytest.raises(CheckpointError, match="already holds checkpoints of a run"):
        train(cfg_for(corpus, tmp_path / "run", iters=6))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    # Resuming it is fine, and keeps the run's id (its checkpoints rotate together).
    resume = cfg_for(corpus, tmp_path / "run", iters=6)
    resume.checkpoint.load = str(tmp_path / "run")
    resume.checkpoint.keep_last = 1
    train(resume)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["iter_0000006"]
    # While a run holds the directory, a second one fails at start and names the holder.
    holder = _lock(tmp_path / "busy")
    try:
        with pytest.raises(CheckpointError, match=r"in use by another run \(\{\"pid\""):
            train(cfg_for(corpus, tmp_path / "busy", iters=1))
    finally:
        holder.close()
    train(cfg_for(corpus, tmp_path / "busy", iters=1))  # released: the directory can be used


def test_resuming_past_train_iters_says_so(loop_corpus, tmp_path, capsys):
    corpus = loop_corpus
    train(cfg_for(corpus, tmp_path / "run", iters=3))
    again = cfg_for(corpus, tmp_path / "run", iters=3)
    again.checkpoint.load = str(tmp_path / "run")
    train(again)
    assert "training is complete, nothing to do" in capsys.readouterr().out
    shorter = cfg_for(corpus, tmp_path / "run", iters=2)
    shorter.checkpoint.load = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"at step 3, beyond training.train_iters = 2"):
        train(shorter)


def test_meta_json_disagreeing_with_the_tensors_is_refused(loop_corpus, tmp_path):
    corpus = loop_corpus
    train(cfg_for(corpus, tmp_path / "run", iters=3))
    ckpt = resolve_checkpoint(tmp_path / "run")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["step"] = 2
    (ckpt / "meta.json").write_text(json.dumps(meta))
    resume = cfg_for(corpus, tmp_path / "run", iters=6)
    resume.checkpoint.load = str(tmp_path / "run")
    with pytest.raises(CheckpointError, match="meta.json says step 2 but its tensors hold step 3"):
        train(resume)


def test_expert_bias_starts_at_zero_from_a_checkpoint_without_one(loop_corpus, tmp_path):
    """Switching a run (or an upcycled, model-only checkpoint) to DeepSeek-V3's auxiliary-loss-free balancing:
    the checkpoint has no expert biases, so they start at zero and move from there; the other tensors load."""
    from megatron_moe.convert.native import load_model

    first = cfg_for(loop_corpus, tmp_path / "run", router="topk", iters=3)
    train(first)
    cfg = cfg_for(loop_corpus, tmp_path / "run", router="topk", iters=4)  # one step: the biases are +-0.05
    cfg.moe.score_function, cfg.moe.expert_bias, cfg.moe.expert_bias_update_rate = "sigmoid", True, 0.05
    cfg.checkpoint.load = str(tmp_path / "run")
    summary = train(cfg)
    assert summary["valid"]
    steps = losses(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4]
    model, meta = load_model(resolve_checkpoint(tmp_path / "run"))
    assert meta["step"] == 4
    values = torch.cat([layer.feed_forward.router.expert_bias for layer in model.layers.values()])
    step = torch.tensor(0.05)  # zero, then one step of +-0.05 (in float32)
    assert set(values.tolist()) <= {-step.item(), 0.0, step.item()} and values.abs().max() > 0
