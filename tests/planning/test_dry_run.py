"""pretrain_moe.py --dry-run: the command, its verdicts and exit codes, the schedule figures, the example layouts."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_moe
from megatron_moe.planning.schedule import bubble_fraction, in_flight

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "4",
        "--moe-ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--vocab-size", "256", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--dry-run", "--world-size", "8"]


@pytest.mark.slow
def test_dry_run_prints_the_table_and_writes_json_without_data(loop_corpus, tmp_path, capsys):
    """No data path; the vocabulary from the tokenizer, padded as training pads it (300 -> 2 x 128 x tp)."""
    out = tmp_path / "plan.json"
    argv = [a for a in TINY if a not in ("--vocab-size", "256")] + ["--tokenizer-model", loop_corpus["tokenizer"]]
    assert pretrain_moe.main(argv + ["--dry-run-output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "8 ranks = pp 2 x dp 2 x tp 2" in table and "PEAK (of 80 GB)" in table and "bubble" in table
    plan = json.loads(out.read_text())
    assert plan["settings"]["vocab_size"] == 512
    assert [r["rank"] for r in plan["ranks"]] == [0, 4]  # first and last stage
    assert plan["does_not_fit"] == [] and plan["parameters"]["total"] > plan["parameters"]["active"] > 0
    first, last = plan["ranks"]
    assert first["in_flight"] == [2] and last["in_flight"] == [1]  # 1F1B
    assert first["comm"]["pp"] > 0 and first["comm"]["tp"] > 0 and first["comm"]["dp"] == 4 * first["params_local"]


@pytest.mark.slow
def test_a_layout_that_does_not_fit_says_so_with_exit_code_8(capsys):
    assert pretrain_moe.main(TINY + ["--dry-run-device-memory", "0.001"]) == pretrain_moe.EXIT_CODES[
        "layout does not fit"] == 8
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("DOES NOT FIT")]
    assert len(lines) == 2 and lines[0].startswith("DOES NOT FIT: rank 0 (stage 0) needs ")
    assert "have 0.001 GB" not in lines[0] and "have 1.000 MB" in lines[0], lines[0]
    assert captured.err.startswith("layout does not fit error: 2 of 2 ranks")


@pytest.mark.parametrize("extra,needle", [
    (["--world-size", "0"], "--dry-run needs --world-size"),
    (["--dry-run-rank", "9"], "--dry-run-rank [9]"),
    (["--world-size", "6"], "world size 6 is not divisible"),
    (["--dry-run-mfu", "2"], "--dry-run-mfu 2.0"),
])
def test_bad_dry_run_options_are_configuration_errors(extra, needle, capsys):
    assert pretrain_moe.main(TINY + extra) == 2
    assert needle in capsys.readouterr().err


def test_dry_run_switches_need_dry_run(capsys):
    assert pretrain_moe.main(["--world-size", "8", "--vocab-size", "256"]) == 2
    assert "--world-size plan a job: they need --dry-run" in capsys.readouterr().err


def test_schedule_figures():
    assert [in_flight("1f1b", 4, r, 16) for r in range(4)] == [[4], [3], [2], [1]]
    assert in_flight("gpipe", 4, 3, 16) == [16] and in_flight("1f1b", 1, 0, 16) == [1]
    # interleaved, torch's warm-up: (v - 1) * m_round + 2 * (p - 1 - r) chunk-forwards, then one more
    assert in_flight("interleaved_1f1b", 2, 0, 4, 2) == [3, 2] and in_flight("interleaved_1f1b", 2, 1, 4, 2) == [2, 1]
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15) and bubble_fraction(4, 12, 2) == pytest.approx(3 / 27)


def _dry_run_cpu_seconds(args: list[str]) -> tuple[int, str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_moe.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, proc.stdout + proc.stderr, cpu


@pytest.mark.slow
@pytest.mark.parametrize("args,code", [
    (["--config", "examples/grin_moe_16x3.8b.toml", "--world-size", "64"], 0),
    (["--config", "examples/qwen3_30b_a3b.toml", "--world-size", "64"], 0),
    # 8 x 4096 tokens per micro-batch: traced with the CPU's loss chunks this plan took 70 s (now 6 s)
    (["--config", "examples/moonlight_16b_a3b.toml", "--world-size", "32"], 0),
    (["--config", "examples/glm45_air.toml", "--world-size", "128"], 0),  # MTP and the embedding copy under PP
    (["--config", "examples/skywork_moe_style.toml", "--world-size", "128", "--pipeline-model-parallel-size", "8",
      "--recompute-granularity", "full", "--use-torch-fsdp2"], 0),
])
def test_example_layouts_at_their_world_size_in_under_a_minute(args, code):
    """CPU time, not wall time: the 2-core CI machine is shared (measured: about 21 s each). Skywork-MoE's
    146 B parameters do not fit 64 H100s as the example sets them (the dry run says so); on 128 with
    pp 8, FSDP2 and full recompute they do."""
    rc, output, cpu = _dry_run_cpu_seconds(args + ["--dry-run"])
    assert rc == code, output
    assert cpu < 60, cpu
    assert "PEAK (of 80 GB)" in output


# DeepSeek-V3's Megatron-LM model arguments as slime passes them (its deepseek-v3.sh), with a depth of multi-token
# prediction and a pipeline layout of 16 stages (3 layers first, 2 and the depth and loss last)
DEEPSEEK_V3_ARGS = """--disable-bias-linear --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432
    --num-attention-heads 128 --kv-channels 128 --normalization RMSNorm --position-embedding-type rope
    --norm-epsilon 1e-6 --swiglu --untie-embeddings-and-output-weights --vocab-size 129280 --multi-latent-attention
    --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 --qk-layernorm
    --rotary-scaling-factor 40 --rotary-base 10000 --mscale 1.0 --mscale-all-dim 1.0 --attention-softmax-in-fp32
    --num-experts 256 --moe-layer-freq [0]*3+[1]*58 --moe-ffn-hidden-size 2048 --moe-router-topk 8
    --moe-shared-expert-intermediate-size 2048 --moe-router-pre-softmax --moe-router-score-function sigmoid
    --moe-router-enable-expert-bias --moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall
    --moe-aux-loss-coeff 0 --moe-router-bias-update-rate 0 --moe-router-group-topk 4 --moe-router-num-groups 8
    --moe-grouped-gemm --moe-router-topk-scaling-factor 2.5 --moe-router-dtype fp32 --moe-permute-fusion
    --mtp-num-layers 1 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
    --pipeline-model-parallel-layout Et*3|(tttt|)*14ttmL --seq-length 4096 --micro-batch-size 1
    --global-batch-size 4096 --bf16 --use-torch-fsdp2 --recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1 --lr 1e-4 --train-iters 1000 --training.device cuda --training.meta_init true"""


@pytest.mark.slow
def test_deepseek_v3_megatron_command_line_plans_at_1024_gpus():
    """The whole model (61 layers, 256 experts, latent attention with YaRN, one MTP depth: 682.6 B parameters here;
    DeepSeek-V3's 671 B + 14 B for its MTP module, which also holds embedding and head copies) from its Megatron-LM
    arguments, planned on 1024 H100s as TP 8 x PP 16 x FSDP2 8: every rank fits, the layout's stages hold 3, 4 x 14
    and 2 layers. Under pipeline stages FSDP2 gathers a stage's parameters once per step: 35 GB of data-parallel
    traffic for the heaviest rank, where gathering them for every micro-batch (512 of them) took 6 TB."""
    import shlex

    rc, output, cpu = _dry_run_cpu_seconds(shlex.split(DEEPSEEK_V3_ARGS) + ["--world-size", "1024", "--dry-run"])
    assert rc == 0, output
    assert cpu < 60, cpu
    assert "682.636 B total" in output and "pp 16 x dp 8 x tp 8" in output
    layers = next(line for line in output.splitlines() if line.startswith("layers "))
    assert layers.split()[1:] == ["0-2", "31-34", "59-60"]  # ranks 0, 512, 960: stages 0, 8, 15
    dp = next(line for line in output.splitlines() if line.startswith("comm/step DP gradients"))
    assert max(float(v) for v in dp.split()[3::2]) < 40  # GB

