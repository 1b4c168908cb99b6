import json

import pytest

from megatron_moe.training.plot import plot_run


def test_plots_written_from_metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "valid_loss": 7.0, "valid_ppl": 1096.6}) + "\n")
        for step in range(1, 6):
            moe = [{"layer": i, "aux_coeff": 0.01 - 0.001 * step, "drop_rate": 0.1 * i, "load": [0.5, 0.25, 0.25],
                    "aux_loss": 0.01, "entropy": 1.0, "load_max_over_mean": 1.5} for i in range(2)]
            f.write(json.dumps({"step": step, "loss": 6.0, "lm_loss": 5.9, "aux_loss": 0.1, "moe": moe}) + "\n")
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "aux_coeff_drop_rate.png", "expert_load.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_missing_or_empty_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "valid_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no training records"):
        plot_run(tmp_path)
