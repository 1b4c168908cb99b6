"""Dense pretraining -> upcycling -> MoE continued pretraining on the demo corpus, end to end on CPU.

Runs the three commands a user would type (printed as they run), then summarises the validation
loss before and after upcycling and the expert similarity over the continued run, and plots it
(<out>/upcycle_demo.png).

    python scripts/upcycle_demo.py --dense-iters 150 --moe-iters 150 --out runs/upcycle_demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def valid_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "valid_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tiny_cpu.toml")
    parser.add_argument("--dense-iters", type=int, default=150)
    parser.add_argument("--moe-iters", type=int, default=150)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--out", default="runs/upcycle_demo")
    args = parser.parse_args()
    out = ROOT / args.out
    dense, upcycled, moe = out / "dense", out / "upcycled", out / "moe"
    for d in (dense, moe):
        if (d / "metrics.jsonl").exists():
            (d / "metrics.jsonl").unlink()
    py = sys.executable
    # The dense model's FFN width becomes the experts' width: top-2 of 8 experts of width 384.
    common = ["--config", args.config, "--ffn-hidden-size", "384", "--lr-warmup-iters", "10"]
    run([py, "pretrain_moe.py", *common, "--num-experts", "0", "--train-iters", str(args.dense_iters),
         "--eval-interval", str(args.dense_iters), "--save", str(dense)])
    run([py, "upcycle_checkpoint.py", "--input", str(dense), "--input-format", "native",
         "--num-experts", str(args.num_experts), "--moe-router-topk", "2", "--output", str(upcycled), "--verify"])
    run([py, "pretrain_moe.py", *common, "--num-experts", str(args.num_experts), "--moe-router-topk", "2",
         "--moe.expert_ffn_hidden_size", "384", "--train-iters", str(args.moe_iters),
         "--eval-interval", str(max(1, args.moe_iters // 6)), "--load", str(upcycled), "--save", str(moe)])

    dense_valid, moe_valid = valid_records(dense), valid_records(moe)
    print("\nstage                          step   valid loss   expert similarity (mean over layers)")
    print(f"{'dense, start':<30}{dense_valid[0]['step']:>5}{dense_valid[0]['valid_loss']:>13.4f}")
    print(f"{'dense, end':<30}{dense_valid[-1]['step']:>5}{dense_valid[-1]['valid_loss']:>13.4f}")
    for r in moe_valid:
        sims = r.get("expert_similarity", [])
        label = "upcycled MoE" + (", start" if r is moe_valid[0] else "")
        print(f"{label:<30}{r['step']:>5}{r['valid_loss']:>13.4f}{sum(sims) / max(1, len(sims)):>14.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_sim) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in dense_valid], [r["valid_loss"] for r in dense_valid], "o-", label="dense")
    offset = dense_valid[-1]["step"]
    ax_loss.plot([offset + r["step"] for r in moe_valid], [r["valid_loss"] for r in moe_valid], "o-",
                 label="upcycled MoE")
    ax_loss.set(xlabel="step (dense, then MoE)", ylabel="validation loss (nats)", title="Upcycled pretraining")
    ax_loss.legend()
    layers = len(moe_valid[0].get("expert_similarity", []))
    for i in range(layers):
        ax_sim.plot([r["step"] for r in moe_valid], [r["expert_similarity"][i] for r in moe_valid], label=f"layer {i}")
    ax_sim.set(xlabel="MoE step", ylabel="mean pairwise cosine", title="Expert similarity (Skywork fig. 2)")
    ax_sim.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "upcycle_demo.png", dpi=110)
    print(f"\nwrote {out / 'upcycle_demo.png'}")


if __name__ == "__main__":
    main()
