"""The dry run's table and its one-sentence verdicts for ranks that do not fit."""

from __future__ import annotations

from megatron_moe.config import Config
from megatron_moe.parallel.mesh import ParallelSizes
from megatron_moe.planning.estimate import GB, RankPlan, fsdp_buffers


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB or nbytes == 0 else f"{nbytes / 1e6:.3f} MB"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M" if n >= 1e4 else f"{n:.0f}"


def does_not_fit(cfg: Config, sizes: ParallelSizes, plan: RankPlan, capacity: float) -> str:
    """"rank R (stage S) needs X GB, have Y: <what would fit>": the alternatives are computed from this
    rank's figures (recompute exactly; FSDP2, a longer pipeline and a smaller micro-batch approximately)."""
    mem = plan.memory
    options = []
    for granularity in ("selective", "full"):
        peak = plan.peak_by_recompute[granularity]
        if granularity != cfg.parallel.recompute_granularity and peak <= capacity:
            options.append(f"--recompute-granularity {granularity} ({_gb(peak)})")
            break
    states = mem["weights"] + mem["gradients"] + mem["optimizer"]
    if sizes.dp > 1 and not cfg.parallel.data_parallel_shard:
        p = plan.params_local / sizes.dp
        fsdp = fsdp_buffers(p, sizes.dp, 2 if cfg.training.bf16 else 4, True, sizes.pp > 1,
                            plan.params_local // max(1, len(plan.layers[0])))
        peak = (mem["peak"] - states - mem["compute_copies"] + 12 * p + sum(fsdp.values()))
        options.append(f"FSDP2 over dp = {sizes.dp} (--use-torch-fsdp2, about {_gb(peak)})")
    pp = 2 * sizes.pp
    if pp * sizes.virtual_stages <= cfg.model.num_layers and sizes.world % (sizes.tp * pp) == 0:
        # model state per rank halves; the first stage holds twice the micro-batches of half the layers
        peak = mem["peak"] - (states + mem["compute_copies"]) / 2
        p = cfg.parallel
        split = (" with a pipeline split for it" if p.pipeline_layout or p.uneven_pipeline
                 or p.account_for_embedding_in_pipeline_split or p.account_for_loss_in_pipeline_split else "")
        options.append(f"raise pp to {pp}{split} (about {_gb(peak)})")
    if cfg.training.micro_batch_size > 1:
        peak = mem["peak"] - (mem["activations"] + mem["backward_transient"]) * (1 - 1 / cfg.training.micro_batch_size)
        options.append(f"--micro-batch-size 1 (about {_gb(peak)})")
    fitting = [o for o in options if _fits(o, capacity)]
    advice = " or ".join(fitting) if fitting else (
        "no single change fits (" + "; ".join(options) + "): combine them or use more GPUs" if options
        else "use more GPUs or a smaller model")
    return (f"rank {plan.rank} (stage {', '.join(map(str, plan.stages))}) needs {_gb(mem['peak'])}, "
            f"have {_gb(capacity)}: {advice}")


def _layer_range(layers: list[int]) -> str:
    """"3-7", "3", or "none" for a stage without decoder layers (a pipeline layout's embedding or loss stage)."""
    if not layers:
        return "none"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _fits(option: str, capacity: float) -> bool:
    amount, unit = option.rsplit("(", 1)[1].rstrip(")").split()[-2:]
    return float(amount) * (GB if unit == "GB" else 1e6) <= capacity


def table(result: dict, source: str = "") -> str:
    """The plan as a text table: one column per rank, then the step's FLOPs, time and bubble."""
    lay, st, params = result["layout"], result["settings"], result["parameters"]
    ranks = result["ranks"]
    lines = [
        f"Dry run{' of ' + source if source else ''}: {lay['world']} ranks = pp {lay['pp']} x dp {lay['dp']} x "
        f"tp {lay['tp']}" + (f" (virtual stages {lay['virtual_stages']})" if lay["virtual_stages"] > 1 else "")
        + f", {st['schedule']}, {lay['num_microbatches']} micro-batches of {st['micro_batch_size']} x "
        f"{st['seq_length']} tokens per rank and step, {'bf16' if st['bf16'] else 'fp32'}, recompute "
        f"{st['recompute']}{', FSDP2' if st['fsdp2'] else ''}",
        f"parameters: {_count(params['total'])} total, {_count(params['active'])} active per token",
        "",
    ]
    rows: list[tuple[str, list[str]]] = [
        ("rank", [str(r["rank"]) for r in ranks]),
        ("pipeline stage(s)", [", ".join(map(str, r["stages"])) for r in ranks]),
        ("layers", [", ".join(_layer_range(ls) for ls in r["layers"]) for r in ranks]),
        ("parameters on the rank", [_count(r["params_local"]) for r in ranks]),
        ("weights (fp32)", [_gb(r["memory"]["weights"]) for r in ranks]),
        ("gradients (fp32)", [_gb(r["memory"]["gradients"]) for r in ranks]),
        ("optimizer (AdamW, fp32)", [_gb(r["memory"]["optimizer"]) for r in ranks]),
        ("FSDP2 unsharded copies", [_gb(r["memory"]["compute_copies"]) for r in ranks]),
    ]
    for g in ("none", "selective", "full"):
        rows.append((f"activations/micro-batch, {g}", [_gb(r["activations_per_micro_batch"][g]) for r in ranks]))
    rows += [
        ("micro-batches in flight", [" + ".join(map(str, r["in_flight"])) for r in ranks]),
        ("activations in flight", [_gb(r["memory"]["activations"] + r["memory"]["backward_transient"])
                                   for r in ranks]),
    ]
    for g in ("none", "selective", "full"):
        rows.append((f"peak, recompute {g}", [_gb(r["peak_by_recompute"][g]) for r in ranks]))
    cap = st["device_memory_gb"] * 1e9
    rows.append((f"PEAK (of {st['device_memory_gb']:g} GB)",
                 [_gb(r["memory"]["peak"]) + ("" if r["memory"]["peak"] <= cap else " !") for r in ranks]))
    for dim, what in (("tp", "TP all-gather/reduce-scatter"), ("pp", "PP send"), ("dp", "DP gradients"),
                      ("balance", "global balance all-reduce"), ("world", "loss/norm/stats")):
        rows.append((f"comm/step {what}", [_gb(r["comm"][dim]) for r in ranks]))
    width = max(len(name) for name, _ in rows) + 2
    col = max(14, *(len(v) + 2 for _, vals in rows for v in vals))
    for name, vals in rows:
        lines.append(name.ljust(width) + "".join(v.rjust(col) for v in vals))
    s = result["step"]
    lines += [
        "",
        f"FLOPs: 6 N + 6 L S A = {s['flops_per_token'] / 1e9:.2f} GFLOP per token (N = matmul parameters a token "
        f"passes), {s['flops_per_step'] / 1e15:.1f} PFLOP per step of {s['tokens_per_step']:,} tokens",
        f"time: at MFU {s['mfu']:.0%} of {s['peak_tflops']:g} TFLOP/s per GPU: {s['step_seconds']:.2f} s per step, "
        f"{s['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU; pipeline bubble {s['bubble_fraction']:.1%} "
        f"of the step",
    ]
    for problem in result["does_not_fit"]:
        lines.append(f"DOES NOT FIT: {problem}")
    return "\n".join(lines)
