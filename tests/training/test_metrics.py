import time

import pytest

from megatron_moe.training.metrics import MetricsWriter, progress_line, read_metrics

RECORD = {"step": 3, "loss": 2.5, "lm_loss": 2.4, "aux_loss": 0.1, "lr": 1e-3, "grad_norm": 0.5,
          "tokens_per_sec": 100.0, "moe": [{"layer": 0, "aux_coeff": 0.01, "drop_rate": 0.2, "load": [0.5, 0.5]}]}


def test_jsonl_records_round_trip(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.log(RECORD)
    writer.log({"step": 3, "valid_loss": 2.0})
    writer.close()
    assert read_metrics(str(tmp_path)) == [RECORD, {"step": 3, "valid_loss": 2.0}]


def test_console_line_shows_num_zeros_and_params_norm_only_when_logged():
    """Megatron-LM's names and order: grad norm, num zeros, params norm."""
    record = {**RECORD, "moe": []}
    assert "num zeros" not in progress_line(record) and "params norm" not in progress_line(record)
    line = progress_line({**record, "num_zeros_in_grad": 1536, "params_norm": 17.59975})
    assert "| gnorm 0.500 | num zeros 1536 | params norm 17.600 |" in line


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
    writer.log(RECORD)
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_directory_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    writer = MetricsWriter(str(tmp_path), wandb_project="megatron-moe-test", wandb_mode="offline",
                           config={"model": {"hidden_size": 8}})
    writer.log(RECORD)
    writer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # wandb's binary record log of the offline run
    # wandb's service process writes the log; on a loaded machine its last records can land shortly
    # after finish() returns, so wait for them (a bounded wait: missing records still fail).
    deadline = time.monotonic() + 30
    while not _has_records(data := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _has_records(data), data[-200:]


def _has_records(data: bytes) -> bool:
    return b"moe/layer0/drop_rate" in data and b"lm_loss" in data and b"hidden_size" in data


def test_tensorboard_dir_gets_the_same_records_as_metrics_jsonl(loop_corpus, tmp_path):
    """--tensorboard-dir (a Megatron-LM flag) reaches the writer: event files hold the jsonl's numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_moe.config import parse_args
    from megatron_moe.training.trainer import train
    from tests.builders import loop_config

    cfg = loop_config(loop_corpus, tmp_path / "run")
    flags, _ = parse_args(["--tensorboard-dir", str(tmp_path / "tb")])
    cfg.logging.tensorboard_dir = flags.logging.tensorboard_dir
    cfg.logging.log_params_norm = cfg.logging.log_num_zeros_in_grad = True
    train(cfg)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file written"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    records = read_metrics(str(tmp_path / "run"))
    for key, layer_key in (("lm_loss", None), ("grad_norm", None), ("valid_loss", None), ("aux_coeff", 0),
                           ("params_norm", None), ("num_zeros_in_grad", None)):
        tag = key if layer_key is None else f"moe/layer{layer_key}/{key}"
        logged = {e.step: e.value for e in events.Scalars(tag)}
        expected = {r["step"]: (r[key] if layer_key is None else r["moe"][layer_key][key])
                    for r in records if (key in r if layer_key is None else "moe" in r)}
        assert logged.keys() == expected.keys() and expected, tag
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6), (tag, step)


_OFFLINE_RUN = """
import sys
from megatron_moe.training.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1], wandb_project="megatron-moe-test", wandb_mode="offline", config={"a": 1})
w.log({"step": 1, "loss": 1.0})
w.close()
print("logged")
"""


def test_wandb_offline_makes_no_network_call_and_runs_no_git(tmp_path):
    """Every process of the run is traced (strace -f): no inet socket is connected (DNS included), git never runs."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", "true"]).returncode:
        pytest.skip("strace (with ptrace permission) is needed to watch every process of the run")
    trace = tmp_path / "trace.txt"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([strace, "-f", "-qq", "-e", "trace=connect,execve", "-o", str(trace), sys.executable, "-c",
                           _OFFLINE_RUN, str(tmp_path / "run")], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).parents[2], env=env)
    assert proc.returncode == 0 and "logged" in proc.stdout, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    assert any("wandb-core" in line for line in lines)  # the trace did see wandb's service process
    network = [line for line in lines if "connect(" in line and ("AF_INET" in line or "AF_INET6" in line)]
    git = [line for line in lines if "execve(" in line and "git" in line and "ENOENT" not in line]
    assert not network and not git, network + git
