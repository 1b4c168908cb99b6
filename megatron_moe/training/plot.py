"""Turn a run's metrics.jsonl into PNG figures.

    python -m megatron_moe.training.plot runs/demo [--out runs/demo/plots]

Writes:
- ``loss.png``: training LM loss, total loss and validation loss over steps;
- ``aux_coeff_drop_rate.png``: per-layer auxiliary-loss coefficient and token-drop rate over steps
  (as Skywork-MoE figure 4);
- ``expert_load.png``: a layers x experts heatmap of the routed-token fractions over the last
  logged steps (as GRIN MoE figure 5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from megatron_moe.training.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, last_steps: int = 5) -> list[Path]:
    """Write the run's figures to ``out_dir`` (default ``<run_dir>/plots``); returns their paths.

    ``last_steps``: how many of the last logged training steps the load heatmap averages.
    Raises FileNotFoundError if the run has no metrics.jsonl, ValueError if it has no training records.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} does not exist: is {run_dir} a run directory?")
    records = read_metrics(str(run_dir))
    steps = [r for r in records if "lm_loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    if not steps:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training records")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in steps], [r["lm_loss"] for r in steps], label="train LM loss")
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss (LM + aux)", alpha=0.6)
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"Loss: {run_dir.name}")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    moe_steps = [r for r in steps if r.get("moe")]
    if moe_steps:
        num_layers = len(moe_steps[0]["moe"])
        x = [r["step"] for r in moe_steps]
        fig, (ax_c, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
        cmap = plt.get_cmap("viridis")
        for i in range(num_layers):
            color = cmap(i / max(1, num_layers - 1))
            ax_c.plot(x, [r["moe"][i]["aux_coeff"] for r in moe_steps], color=color, label=f"layer {i}")
            ax_d.plot(x, [r["moe"][i]["drop_rate"] for r in moe_steps], color=color, label=f"layer {i}")
        ax_c.set(xlabel="step", ylabel="alpha", title="Auxiliary-loss coefficient per MoE layer")
        ax_d.set(xlabel="step", ylabel="drop rate", title="Token-drop rate per MoE layer")
        ax_d.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out_dir / "aux_coeff_drop_rate.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        load = np.mean([[layer["load"] for layer in r["moe"]] for r in moe_steps[-last_steps:]], axis=0)
        num_experts = load.shape[1]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * num_experts + 2), max(3, 0.4 * num_layers + 1.5)))
        im = ax.imshow(load * num_experts, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        ax.set(xlabel="expert", ylabel="MoE layer", title="Expert load (1 = uniform), last logged steps")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers))
        fig.colorbar(im, ax=ax, label="load / uniform load")
        fig.tight_layout()
        written.append(out_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a run's metrics.jsonl")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output folder (default <run_dir>/plots)")
    parser.add_argument("--last-steps", type=int, default=5, help="logged steps averaged in the load heatmap")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out, args.last_steps):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
