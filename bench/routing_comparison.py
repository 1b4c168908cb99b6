"""Compare routers and auxiliary-coefficient schedules on the demo model (same seed, same data).

Runs six short CPU pretraining runs of examples/tiny_cpu.toml:
  {top-K softmax, SparseMixer-v2, top-K + gating logit normalisation} x {constant, adaptive coefficients}
and prints, side by side from this one run: final validation loss, mean token-drop rate (capacity
factor 1, over the second half of training), expert-load spread (max/mean load, averaged over layers
and the second half), and the final mean aux coefficient. Writes <out>/results.json and
<out>/routing_comparison.png (validation loss and drop rate over steps).

    python bench/routing_comparison.py --train-iters 200 --out runs/routing_comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from megatron_moe.config import parse_args
from megatron_moe.training.metrics import read_metrics
from megatron_moe.training.trainer import train

VARIANTS = {
    "topk": ["--moe.router", "topk"],
    "sparsemixer": ["--moe.router", "sparsemixer"],
    "topk+logitnorm": ["--moe.router", "topk", "--moe.logit_norm", "true"],
}
COEFFICIENTS = {
    "constant": ["--moe.adaptive_aux", "false"],
    "adaptive": ["--moe.adaptive_aux", "true"],
}


def summarise(run_dir: Path) -> dict:
    records = read_metrics(str(run_dir))
    steps = [r for r in records if "moe" in r]
    valid = [r for r in records if "valid_loss" in r]
    second_half = steps[len(steps) // 2 :]
    drop = statistics.mean(statistics.mean(layer["drop_rate"] for layer in r["moe"]) for r in second_half)
    spread = statistics.mean(statistics.mean(layer["load_max_over_mean"] for layer in r["moe"]) for r in second_half)
    coeff = statistics.mean(layer["aux_coeff"] for layer in steps[-1]["moe"])
    return {
        "final_valid_loss": valid[-1]["valid_loss"],
        "first_valid_loss": valid[0]["valid_loss"],
        "mean_drop_rate": drop,
        "load_max_over_mean": spread,
        "final_aux_coeff": coeff,
        "valid_curve": [(r["step"], r["valid_loss"]) for r in valid],
        "drop_curve": [(r["step"], statistics.mean(layer["drop_rate"] for layer in r["moe"])) for r in steps],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in results.items():
        style = "-" if name.endswith("constant") else "--"
        ax_loss.plot(*zip(*res["valid_curve"], strict=True), style, marker="o", label=name)
        ax_drop.plot(*zip(*res["drop_curve"], strict=True), style, label=name)
    ax_loss.set(xlabel="step", ylabel="validation loss (nats)", title="Validation loss")
    ax_drop.set(xlabel="step", ylabel="drop rate at capacity factor 1", title="Token-drop rate (mean over layers)")
    ax_loss.legend(fontsize=8)
    ax_drop.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tiny_cpu.toml")
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--out", default="runs/routing_comparison")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for variant, variant_args in VARIANTS.items():
        for schedule, schedule_args in COEFFICIENTS.items():
            name = f"{variant}/{schedule}"
            run_dir = out / name.replace("/", "_")
            if (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()
            argv = ["--config", args.config, "--train-iters", str(args.train_iters),
                    "--eval-interval", str(max(1, args.train_iters // 4)), "--save", str(run_dir),
                    *variant_args, *schedule_args, *args.extra]
            cfg, _ = parse_args(argv)
            print(f"=== {name}: {' '.join(argv)}", flush=True)
            start = time.perf_counter()
            train(cfg)
            results[name] = summarise(run_dir) | {"wall_time_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "routing_comparison.png")
    print(f"\n{'run':<28}{'valid loss':>12}{'drop rate':>12}{'max/mean load':>15}{'final alpha':>13}{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<28}{r['final_valid_loss']:>12.4f}{r['mean_drop_rate']:>12.4f}"
              f"{r['load_max_over_mean']:>15.3f}{r['final_aux_coeff']:>13.2e}{r['wall_time_s']:>9.1f}")
    print(f"\nwrote {out / 'results.json'} and {out / 'routing_comparison.png'}")


if __name__ == "__main__":
    main()
