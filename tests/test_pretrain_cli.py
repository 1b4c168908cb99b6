"""pretrain_moe.py: errors a user can cause are one line and a distinct exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_moe

ROOT = Path(__file__).resolve().parents[1]


def _flags(corpus: dict, run_dir: Path) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-experts", "4",
            "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1", "--eval-interval", "0", "--training.device", "cpu",
            "--data-path", corpus["prefix"], "--tokenizer-model", corpus["tokenizer"], "--split", "90,10,0",
            "--data.cache_dir", str(corpus["root"] / "cache"), "--save", str(run_dir)]


@pytest.mark.parametrize("change,kind,code,needle", [
    ({"--tokenizer-model": "missing.model"}, "data", 4, "missing.model"),
    ({"--lr": "nan"}, "configuration", 2, "optimizer.lr = nan"),
    ({"--load": "{tmp}/not_a_checkpoint"}, "checkpoint", 3, "not_a_checkpoint"),
    ({"--eval-iters": "0", "--eval-only": None, "--load": "{tmp}/good"}, "configuration", 2, "evaluates nothing"),
    ({"--vocab-size": "64"}, "configuration", 2, "model.vocab_size = 64 is smaller"),
])
def test_user_errors_are_one_line_and_an_exit_code(loop_corpus, tmp_path, capsys, change, kind, code, needle):
    assert pretrain_moe.main(_flags(loop_corpus, tmp_path / "good")) == 0  # the unchanged run works
    capsys.readouterr()
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "notes.txt").write_text("something else")
    argv = _flags(loop_corpus, tmp_path / "run")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value.format(tmp=tmp_path)
        else:
            argv += [flag] if value is None else [flag, value.format(tmp=tmp_path)]
    assert pretrain_moe.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{kind} error:") and needle in err, err


def test_cli_error_has_no_traceback(tmp_path):
    argv = ["--tokenizer-model", str(tmp_path / "t.model"), "--data-path", str(tmp_path / "d"),
            "--training.device", "cpu"]
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_moe.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "t.model" in proc.stderr


def test_load_of_a_directory_without_checkpoints_starts_from_scratch(loop_corpus, tmp_path, capsys):
    """Megatron-LM's usual first run: --save X --load X with X empty or missing."""
    argv = _flags(loop_corpus, tmp_path / "run") + ["--load", str(tmp_path / "run")]
    assert pretrain_moe.main(argv) == 0
    assert "holds no checkpoint yet; starting from scratch" in capsys.readouterr().out
    assert (tmp_path / "run" / "latest").is_file()
    assert pretrain_moe.main(argv + ["--train-iters", "2"]) == 0  # the second run resumes from it
    assert "resumed from" in capsys.readouterr().out
    eval_only = _flags(loop_corpus, tmp_path / "e") + ["--load", str(tmp_path / "empty"), "--eval-only"]
    assert pretrain_moe.main(eval_only) == 3  # nothing to evaluate is still an error



@pytest.mark.slow
def test_load_takes_the_architecture_from_the_checkpoint(loop_corpus, tmp_path, capsys):
    """--load with only data, tokenizer and training flags builds the checkpoint's model (issue 11 item 5);
    an architecture flag that contradicts it is an error naming both values."""
    import json

    shape = ["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe.first_k_dense", "1",
             "--moe.router", "sparsemixer", "--normalization", "LayerNorm", "--add-qkv-bias", "--use-rope-scaling"]
    training = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-interval", "0",
                "--training.device", "cpu", "--data-path", loop_corpus["prefix"],
                "--tokenizer-model", loop_corpus["tokenizer"], "--split", "90,10,0",
                "--data.cache_dir", str(loop_corpus["root"] / "cache")]
    assert pretrain_moe.main(shape + training + ["--train-iters", "1", "--save", str(tmp_path / "a")]) == 0
    resumed = training + ["--train-iters", "2", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b")]
    assert pretrain_moe.main(resumed) == 0
    assert "resumed from" in capsys.readouterr().out
    meta = json.loads(next((tmp_path / "b").glob("iter_*/meta.json")).read_text())
    model, moe = meta["config"]["model"], meta["config"]["moe"]
    assert (model["hidden_size"], model["num_query_groups"], model["normalization"], model["add_qkv_bias"],
            model["rope_scaling"]) == (48, 2, "LayerNorm", True, "llama3")
    assert (moe["num_experts"], moe["first_k_dense"], moe["router"]) == (4, 1, "sparsemixer")
    assert meta["config"]["training"]["train_iters"] == 2  # training settings are the command line's
    contradicting = resumed[:-1] + [str(tmp_path / "c"), "--hidden-size", "64"]
    assert pretrain_moe.main(contradicting) == 3
    err = capsys.readouterr().err
    assert "model.hidden_size: checkpoint 48, config 64" in err, err
