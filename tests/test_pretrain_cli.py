"""pretrain_moe.py: errors a user can cause are one line and a distinct exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_moe
from megatron_moe.training.checkpoint import read_meta

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
    ({"--save": "{tmp}/not_a_checkpoint/notes.txt/run"}, "checkpoint", 3, "cannot create this directory"),
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


def _mixtral_example(corpus: dict, checkpoint: Path, moe: bool = True) -> list[str]:
    """Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh, flag for flag in its order, with the
    sizes shrunk (layers, widths, experts, batch, iterations, intervals, parallel sizes) and the paths and the
    split pointed at the test corpus. Nothing else changed."""
    model = ["--use-mcore-models", "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "64",
             "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
             "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
             "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
             "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
             "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000"]
    moe_args = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
                "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
                "--overlap-param-gather", "--overlap-grad-reduce"]
    data = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", corpus["tokenizer"],
            "--data-path", corpus["prefix"], "--split", "90,8,2"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-4", "--train-iters", "2",
                "--lr-decay-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
                "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--bf16"]
    model_parallel = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                      "--expert-model-parallel-size", "1", "--use-distributed-optimizer", "--sequence-parallel"]
    logging = ["--log-interval", "1", "--save-interval", "1", "--eval-interval", "1", "--eval-iters", "1",
               "--save", str(checkpoint), "--load", str(checkpoint), "--tensorboard-dir", f"{checkpoint}/tensorboard",
               "--no-load-optim", "--no-load-rng", "--wandb-project", "Mixtral", "--wandb-exp-name", "Mixtral_8x7B"]
    return model + (moe_args if moe else []) + data + training + model_parallel + logging


@pytest.mark.slow
def test_megatron_mixtral_example_command_line_runs_unmodified(loop_corpus, tmp_path, capsys, monkeypatch):
    """Its first run starts from scratch in the empty --load directory, the second resumes (without the
    optimizer state: --no-load-optim); both print only notes for Megatron's own machinery."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    checkpoint = tmp_path / "mixtral"
    argv = _mixtral_example(loop_corpus, checkpoint)
    assert pretrain_moe.main(argv) == 0
    captured = capsys.readouterr()
    assert "holds no checkpoint yet; starting from scratch" in captured.out
    assert ("architecture: RMSNorm, SwiGLU, RoPE theta 1e+06, no biases, untied embeddings, 4 heads / 2 KV heads of 8, "
            "4 experts top-2 (topk router) every layer") in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert {n.split()[1] for n in notes} == {"--use-mcore-models", "--max-position-embeddings",
                                             "--no-masked-softmax-fusion", "--moe-grouped-gemm",
                                             "--moe-token-dispatcher-type", "--overlap-param-gather",
                                             "--use-distributed-optimizer"}, captured.err
    assert (checkpoint / "latest").read_text().strip() == "iter_0000002"
    assert list((checkpoint / "tensorboard").glob("events.out.tfevents.*"))
    assert list((checkpoint / "wandb").glob("offline-run-*"))
    more = [v if v not in ("2",) or argv[i - 1] not in ("--train-iters", "--lr-decay-iters") else "4"
            for i, v in enumerate(argv)]
    assert pretrain_moe.main(more) == 0
    out = capsys.readouterr().out
    assert "optimizer state not loaded" in out and "resumed from" in out and "at step 2" in out
    assert "RNG reseeded: checkpoint.load_rng = false" in out
    assert (checkpoint / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.slow
def test_megatron_dense_command_line_trains_a_dense_model(loop_corpus, tmp_path, capsys):
    """The same script without its MoE flags is a dense model, as in Megatron-LM (not this project's MoE)."""
    argv = _mixtral_example(loop_corpus, tmp_path / "dense", moe=False)
    argv = argv[: argv.index("--wandb-project")]
    assert pretrain_moe.main(argv) == 0
    meta = read_meta(tmp_path / "dense" / "iter_0000002")
    assert meta["config"]["moe"]["num_experts"] == 0
    assert meta["config"]["optimizer"]["adam_beta2"] == 0.999  # Megatron-LM's default, not this project's 0.95


@pytest.mark.slow
def test_megatron_per_split_paths_and_sample_based_run(loop_corpus, tmp_path):
    """--train-data-path / --valid-data-path, --train-samples with --lr-warmup-fraction, --eod-mask-loss."""
    argv = _flags(loop_corpus, tmp_path / "run")
    i = argv.index("--data-path")
    argv[i:i + 2] = ["--train-data-path", loop_corpus["prefix"], "--valid-data-path", loop_corpus["prefix"]]
    i = argv.index("--train-iters")
    argv[i:i + 2] = ["--train-samples", "5", "--lr-warmup-fraction", "0.2", "--eod-mask-loss", "--eval-iters", "1"]
    assert pretrain_moe.main(argv) == 0
    meta = read_meta(tmp_path / "run" / "iter_0000002")  # 5 samples // global batch 2 = 2 iterations
    assert meta["train_samples"] == 5 and meta["config"]["data"]["eod_mask_loss"] is True


@pytest.mark.slow
def test_finetune_loads_the_weights_only_and_starts_at_step_zero(loop_corpus, tmp_path, capsys):
    assert pretrain_moe.main(_flags(loop_corpus, tmp_path / "base") + ["--train-iters", "2"]) == 0
    capsys.readouterr()
    argv = _flags(loop_corpus, tmp_path / "ft") + ["--load", str(tmp_path / "base"), "--finetune"]
    assert pretrain_moe.main(argv) == 0
    assert "starting a new run at step 0" in capsys.readouterr().out
    assert (tmp_path / "ft" / "latest").read_text().strip() == "iter_0000001"


@pytest.mark.slow
def test_exit_duration_saves_and_stops(loop_corpus, tmp_path, capsys, monkeypatch):
    """--exit-duration-in-mins 1 with a clock that advances a minute per reading: stop after step 1, saved."""
    import types

    from megatron_moe.training import trainer

    clock = iter(range(0, 10**6, 61))
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    argv = _flags(loop_corpus, tmp_path / "run") + ["--train-iters", "5", "--exit-duration-in-mins", "1"]
    assert pretrain_moe.main(argv) == 0
    assert "stopping at step 1" in capsys.readouterr().out
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000001"


@pytest.mark.slow
def test_megatron_example_under_torchrun_trains_one_two_rank_world(loop_corpus, tmp_path):
    """torchrun, one process per device (Megatron-LM's launch): the two processes form one tp=2 world and
    save one checkpoint of that layout; the Megatron example runs as it is, tp raised to 2."""
    checkpoint = tmp_path / "mixtral"
    argv = _mixtral_example(loop_corpus, checkpoint)
    argv[argv.index("--tensor-model-parallel-size") + 1] = "2"
    argv = argv[: argv.index("--wandb-project")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "pretrain_moe.py"), *argv, "--training.device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "layout: tp=2 pp=1 dp=1 (2 ranks)" in run.stdout, run.stdout
    meta = read_meta(checkpoint / "iter_0000002")
    assert meta["step"] == 2 and meta["layout"] == {"tp": 2, "pp": 1, "dp": 1, "virtual_stages": 1}, meta["layout"]


@pytest.mark.slow
def test_megatron_llama3_example_command_line_runs_unmodified(tmp_path, capsys):
    """Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh with DTYPE=bf16 (its fp8 flags are the
    one thing refused: fp8 is not supported) and its real-data branch (a Hugging Face tokenizer), flag
    for flag in its order; sizes, sample counts, intervals and paths shrunk or pointed at a test corpus,
    the split chosen so the tiny corpus has a validation set (quoted, as the script's bash array passes it on).
    It uses decoupled learning rates, norms
    with zero-centred scales, bf16 gradient reduction and the per-token loss."""
    from megatron_moe.data.preprocess import preprocess_files
    from megatron_moe.data.tokenizer import load_tokenizer
    from tests.builders import WORDS_A, make_documents, write_jsonl
    from tests.data.helpers import make_hf_tokenizer

    docs = make_documents(WORDS_A, 200, seed=5)
    tokenizer = make_hf_tokenizer(tmp_path / "hf", docs)
    data = preprocess_files([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "a"),
                            load_tokenizer(str(tokenizer)), log=None).prefix
    checkpoint, tensorboard = tmp_path / "llama3", tmp_path / "tb"
    model = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
             "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "8",
             "--seq-length", "16", "--max-position-embeddings", "16", "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--swiglu", "--normalization", "RMSNorm", "--init-method-std", "0.0134",
             "--attention-backend", "fused",
             "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "2", "--train-samples", "4",
                "--lr-decay-samples", "4", "--lr-warmup-samples", "2", "--lr", "0.00015", "--min-lr", "0.00001",
                "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--lr-decay-style", "cosine",
                "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                "--bf16", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion", "--calculate-per-token-loss",
                "--manual-gc", "--empty-unused-memory-level", "1", "--exit-duration-in-mins", "235",
                "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    model_parallel = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1", "--sequence-parallel"]
    data_args = ["--data-path", data, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
                 # the script's bash array passes its quotes on: --split '99,1,0' arrives as "'99,1,0'"
                 "--data-cache-path", str(tmp_path / "cache"), "--split", "'90,10,0'",
                 "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers", "1",
                 "--vocab-size", "512"]
    logging = ["--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1", "--save-interval", "1",
               "--log-throughput", "--profile", "--profile-step-start", "4", "--profile-step-end", "6",
               "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "60", "--save", str(checkpoint),
               "--load", str(checkpoint), "--tensorboard-dir", str(tensorboard)]
    assert pretrain_moe.main(model + training + model_parallel + data_args + logging) == 0
    out = capsys.readouterr()
    assert "holds no checkpoint yet; starting from scratch" in out.out, out.err
    meta = read_meta(checkpoint / "iter_0000002")
    m, o, t = meta["config"]["model"], meta["config"]["optimizer"], meta["config"]["training"]
    assert (m["normalization"], m["apply_layernorm_1p"], o["decoupled_lr"], o["decoupled_min_lr"]) == (
        "RMSNorm", True, 5e-4, 4.5e-5)
    assert t["calculate_per_token_loss"] and meta["config"]["parallel"]["grad_reduce_in_bf16"] and t["bf16"]
    assert list(tensorboard.glob("events.out.tfevents.*"))
