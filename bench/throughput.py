"""Training throughput side by side: this project vs Hugging Face Mixtral (and torchtitan where it imports),
and the ablations that show where the time goes. One process, one device, one table.

Every row trains the same architecture for the same batches: forward, backward, gradient clipping
at 1.0 and an AdamW step - each framework as its users get it by default: the engine's train step
with this project's fused AdamW; for Hugging Face the usual loop with its load-balancing loss on
(as ours is) and the optimizer transformers' Trainer picks by default (``TrainingArguments.optim``:
``adamw_torch_fused`` with torch >= 2.8, torch's fused AdamW, as ours). Rows that compare
implementations start from the same weights, checked by comparing logits before timing.

    ours              this project, top-K router, grouped expert GEMM, fp32
    hf-grouped        transformers MixtralForCausalLM, experts_implementation="grouped_mm"
    hf-eager          the same, experts_implementation="eager" (a loop over experts)
    torchtitan        this project with torchtitan's MoE layer (router, token dispatcher, grouped experts) in place
                      of each of ours, same weights, where torchtitan imports (else the reason it does not);
                      its experts compute in bf16 whatever the precision, so compare it with "ours" in bf16
    dense             this project, dense SwiGLU of equal active parameters (ffn = K x expert ffn)
    sparsemixer       this project, SparseMixer-v2 router
    expert-loop       this project, a per-expert loop instead of the grouped GEMM
    bf16 | fp32       this project in the other precision than "ours" (bf16: bf16 compute from fp32
                      master weights; "ours" is bf16 when the config sets training.bf16)
    compile           this project, --compile (torch.compile per block)

Timing: after warm-up steps, ``--rounds`` rounds in which every row runs ``--steps`` steps in turn
(interleaved, so drifts of the machine hit all rows alike); a row's tokens/s is the median over rounds, its
"spread" (max - min) / median of the rounds' tokens/s: two rows closer than their spreads are not measurably
different.

MFU = model FLOP/s / peak FLOP/s of the device (``--peak-tflops``; known for H100/H200 in bf16,
otherwise not reported). Model FLOPs per token of a training step: ``6 N + 6 L S A``
(:mod:`megatron_moe.planning.flops`, shared with the dry run).

Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA; on CPU, the peak of
tensor memory of one step measured by torch's MemTracker.

Below each table: the experts' grouped GEMM against one dense GEMM of the same FLOPs (:func:`gemm_efficiency`).

    make bench      # = .venv/bin/python bench/throughput.py: on CPU two small shapes (about 3 minutes);
                    # on a GPU examples/bench_h100.toml (one 80 GB H100); --bf16: the CPU shapes in bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_moe.config import Config, parse_args
from megatron_moe.model.moe import GroupedExperts, MoELayer
from megatron_moe.model.transformer import build_model, main_logits
from megatron_moe.parallel.engine import ParallelEngine, init_distributed_from_env
from megatron_moe.planning.flops import matmul_active_params, model_flops_per_token
from megatron_moe.training.optim import build_optimizer
from megatron_moe.training.state import canonical_name

# CPU shapes (fp32 on 2 cores): the demo's size and the larger shape the targets refer to.
CPU_SHAPES = {
    "small": ["--hidden-size", "128", "--num-layers", "2", "--num-attention-heads", "4", "--num-query-groups", "2",
              "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256", "--seq-length", "256",
              "--micro-batch-size", "4", "--global-batch-size", "4", "--vocab-size", "2048"],
    "large": ["--hidden-size", "512", "--num-layers", "2", "--num-attention-heads", "8", "--num-query-groups", "4",
              "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "1024", "--seq-length", "512",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--vocab-size", "4096"],
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


@dataclasses.dataclass
class Row:
    name: str
    step: Callable[[], None] | None  # one training step; None = not available
    module: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    note: str = ""
    times: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int | None = None
    slow: bool = False  # far slower than the rest: one warm-up step, then one timed step in the first round only


def _batches(cfg: Config, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    t, s = cfg.training, cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, s + 1), generator=g)
    out = []
    for i in range(0, t.global_batch_size, t.micro_batch_size):
        chunk = tokens[i : i + t.micro_batch_size]
        out.append({"tokens": chunk[:, :-1].contiguous().to(device), "labels": chunk[:, 1:].contiguous().to(device),
                    "loss_mask": torch.ones(chunk.shape[0], s, device=device)})
    return out


def _ours(name: str, cfg: Config, device: torch.device, note: str = "") -> Row:
    engine = ParallelEngine(cfg, device=device)
    module = engine.build_model()
    optimizer = build_optimizer(module, cfg.optimizer)
    batches = _batches(cfg, device)
    module.train()
    return Row(name, lambda: engine.train_step(batches, optimizer, 1.0), module, optimizer, note)


def _per_expert_loop(self: GroupedExperts, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The experts as a Python loop of dense matmuls (what the grouped GEMM replaces)."""
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        x = x_sorted[start:end]
        outs.append((F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e])
        start = end
    return torch.cat(outs)


class _ExpertLoop(GroupedExperts):
    forward = _per_expert_loop


def _expert_loop_row(cfg: Config, device: torch.device) -> Row:
    row = _ours("expert-loop", cfg, device)
    for m in row.module.modules():
        if type(m) is GroupedExperts:
            m.__class__ = _ExpertLoop
    return row


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU tensors by single-device name (DTensors of wrapped modules gathered)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[canonical_name(k)] = v.detach().float().cpu()
    return out


def _hf_row(name: str, impl: str, cfg: Config, ours: torch.nn.Module, device: torch.device) -> Row:
    """Mixtral with our weights (export path of megatron_moe.convert.export_hf), logits checked equal in fp32.

    With ``training.bf16`` it trains as transformers' Trainer does in bf16: fp32 weights, bf16 autocast.
    """
    try:
        from transformers import MixtralForCausalLM, TrainingArguments

        from megatron_moe.convert.export_hf import hf_config, hf_state_dict, write_safetensors
        from megatron_moe.convert.hf_config import export_blockers
    except ImportError as e:
        return Row(name, None, note=f"transformers not importable: {e}")
    blockers = export_blockers(cfg, "mixtral")
    if blockers:  # e.g. query/key norms, a shared expert, sigmoid routing: no Mixtral computes this model
        return Row(name, None, note=f"not a Mixtral model: {blockers[0]}")
    state = _plain_state(ours)
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(hf_state_dict(cfg, state, "mixtral"), Path(tmp), 2**40)
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config(cfg, "mixtral") | {"output_router_logits": True}))
        hf = MixtralForCausalLM.from_pretrained(tmp, experts_implementation=impl, dtype=torch.float32).to(device)
    reference = build_model(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, bf16=False)), "cpu")
    reference.load_state_dict(state)
    batches = _batches(cfg, device)
    with torch.no_grad():
        ours = main_logits(reference.eval()(batches[0]["tokens"].cpu()))
        diff = (hf.eval()(batches[0]["tokens"]).logits.cpu() - ours).abs()
        diff = diff.max().item()
    del reference
    if diff > 1e-3:
        raise RuntimeError(f"{name}: logits differ from ours by {diff:.2e}; the comparison would be meaningless")
    hf.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.bf16)
    # transformers' Trainer default optimizer: "adamw_torch_fused" (torch >= 2.8) or "adamw_torch".
    fused = TrainingArguments.default_optim == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(hf.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
                                  betas=(cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2),
                                  fused=True if fused else None)
    full = [torch.cat([b["tokens"], b["labels"][:, -1:]], dim=1) for b in batches]

    def step() -> None:
        for ids in full:  # HF shifts labels itself: the same S next-token predictions per sequence
            with autocast:
                out = hf(input_ids=ids[:, :-1], labels=ids[:, 1:].clone())
            (out.loss / len(full)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Row(name, step, hf, optimizer, f"logits equal to ours within {diff:.1e}")


class _TorchtitanMoE(torch.nn.Module):
    """torchtitan's MoE layer (token-choice top-K router, local token dispatcher, grouped experts) holding
    the weights of one of our MoE layers (torchtitan stores the experts transposed: [E, ffn, hidden])."""

    def __init__(self, ours: MoELayer, cfg: Config):
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts as TitanExperts
        from torchtitan.models.common.moe import MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        super().__init__()
        h, f, e, k = cfg.model.hidden_size, cfg.expert_ffn_size, cfg.moe.num_experts, cfg.moe.topk
        self.moe = MoE.Config(
            num_experts=e, load_balance_coeff=None,  # no expert-bias balancing: the same routing as ours
            routed_experts=RoutedExperts.Config(
                inner_experts=TitanExperts.Config(dim=h, hidden_dim=f, num_experts=e),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
            router=TokenChoiceTopKRouter.Config(num_experts=e, gate=Linear.Config(in_features=h, out_features=e),
                                                top_k=k, score_func="softmax", route_norm=cfg.moe.renormalize),
        ).build()
        experts = self.moe.routed_experts.inner_experts
        with torch.no_grad():
            self.moe.router.gate.weight.copy_(ours.router.gate.weight)
            experts.w1_EFD.copy_(ours.experts.w1.transpose(1, 2))
            experts.w3_EFD.copy_(ours.experts.w3.transpose(1, 2))
            experts.w2_EDF.copy_(ours.experts.w2.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


def _torchtitan_row(cfg: Config, ours: torch.nn.Module, device: torch.device) -> Row:
    """This project's model with torchtitan's MoE layer in place of each of ours, same weights, trained
    by the same engine step. torchtitan's experts compute in bf16 whatever the model's dtype, and its
    layer adds no auxiliary loss (ours adds the configured one)."""
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return Row("torchtitan", None, note=f"not importable ({type(e).__name__}: {e})")
    if cfg.moe.router != "topk" or cfg.moe.logit_norm:
        return Row("torchtitan", None, note=f"its router has no equivalent of moe.router = {cfg.moe.router!r} "
                                            "with moe.logit_norm; bench a top-K config")
    model = build_model(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, bf16=False)), "cpu")
    model.load_state_dict(_plain_state(ours))
    diff = 0.0
    # on the host, so 64 tokens: the GPU config's layers are large
    x = torch.randn(1, min(cfg.data.seq_length, 64), cfg.model.hidden_size, generator=torch.Generator().manual_seed(0))
    for block in model.layers.values():
        if isinstance(block.feed_forward, MoELayer):
            theirs = _TorchtitanMoE(block.feed_forward, cfg)
            with torch.no_grad():  # each layer on the same input (the whole model's logits would amplify
                # the bf16 rounding into flipped top-K choices of later layers)
                expected = block.feed_forward.eval()(x)
                diff = max(diff, ((theirs.eval()(x) - expected).norm() / expected.norm()).item())
            block.feed_forward = theirs
    if diff > 1e-2:  # its bf16 experts round each expert output to ~3 significant digits
        raise RuntimeError(f"torchtitan: its MoE layers differ from ours by {diff:.2e} (relative); the comparison "
                           "would be meaningless")
    engine = ParallelEngine(cfg, device=device)
    module = engine.build_model(model=model.to(device).train(), seed_rng=False)
    optimizer = build_optimizer(module, cfg.optimizer)
    batches = _batches(cfg, device)
    note = f"its MoE layer in ours; experts always bf16; no aux loss; outputs equal ours to {diff:.1e} (rel.)"
    return Row("torchtitan", lambda: engine.train_step(batches, optimizer, 1.0), module, optimizer, note)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_peak(row: Row, device: torch.device) -> None:
    if device.type == "cuda":
        return  # measured over the timed steps
    try:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(row.module, row.optimizer)
        with tracker:
            row.step()
        row.peak_bytes = int(tracker.get_tracker_snapshot("peak")[device]["Total"])
    except Exception as e:  # noqa: BLE001 - e.g. compiled modules; reported, not fatal
        row.note = (row.note + "; " if row.note else "") + f"peak memory not measured ({type(e).__name__})"


def build_rows(cfg: Config, device: torch.device, only: set[str] | None) -> list[Row]:
    def wanted(name: str) -> bool:
        return only is None or name in only

    rows = [_ours("ours", cfg, device, "bf16, fp32 master weights" if cfg.training.bf16 else "fp32")]
    for name, impl in (("hf-grouped", "grouped_mm"), ("hf-eager", "eager")):
        if wanted(name):
            rows.append(_hf_row(name, impl, cfg, rows[0].module[0], device))
    if wanted("torchtitan"):
        try:  # a torchtitan release whose API moved must not cost the other rows of a (GPU) run
            rows.append(_torchtitan_row(cfg, rows[0].module[0], device))
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append(Row("torchtitan", None, note=f"could not be built ({type(e).__name__}: {e})"))
    if wanted("dense"):
        dense_ffn = cfg.moe.topk * cfg.expert_ffn_size
        dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=0),
                                    model=dataclasses.replace(cfg.model, ffn_hidden_size=dense_ffn))
        rows.append(_ours("dense", dense, device, f"ffn {dense.model.ffn_hidden_size} = top-K x expert ffn"))
    if wanted("sparsemixer") and cfg.moe.topk != 2:
        rows.append(Row("sparsemixer", None, note=f"SparseMixer-v2 routes 2 experts, this config {cfg.moe.topk}"))
    elif wanted("sparsemixer"):  # the same model with GRIN's router in place of the top-K one
        sparsemixer = dataclasses.replace(cfg, moe=dataclasses.replace(
            cfg.moe, router="sparsemixer", score_function="softmax", expert_bias=False, topk_scaling_factor=1.0))
        rows.append(_ours("sparsemixer", sparsemixer, device))
    if wanted("expert-loop"):
        rows.append(_expert_loop_row(cfg, device))
    other = "fp32" if cfg.training.bf16 else "bf16"  # the other precision than "ours"
    if wanted(other):
        flipped = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, bf16=not cfg.training.bf16))
        rows.append(_ours(other, flipped, device, "fp32 master weights" if other == "bf16" else ""))
    if wanted("compile"):
        rows.append(_ours("compile", dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=True)),
                          device))
    emulated = device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for row in rows:
        if emulated and row.step is not None and (row.name == "bf16" or cfg.training.bf16 and row.name != "fp32"):
            # Without AVX512-BF16/AMX, oneDNN emulates bf16 matmuls (12-25x slower than fp32, measured on
            # an AVX2-only CPU): one timed step keeps the bench within minutes.
            row.slow = True
            emulated_note = "no native bf16 matmul on this CPU (oneDNN emulates it); one timed step"
            row.note = (row.note + "; " if row.note else "") + emulated_note
    return rows


def _drop(row: Row, device: torch.device) -> None:
    """Release a row's model, optimizer state and step (it is reported as not available)."""
    row.step = row.module = row.optimizer = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: Config, device: torch.device, warmup: int, steps: int, rounds: int, only: set[str] | None,
        peak_tflops: float | None) -> dict:
    rows = build_rows(cfg, device, only)
    for row in rows:
        if row.step is None:
            continue
        try:
            for _ in range(1 if row.slow else warmup):
                row.step()
            _measure_peak(row, device)
        except torch.cuda.OutOfMemoryError:
            if row is rows[0]:
                raise  # without "ours" there is nothing to compare with
            _drop(row, device)  # the rows built before it hold their weights and optimizer states
            row.note = f"out of GPU memory beside the other rows: bench it with --rows {row.name}"
    live = [r for r in rows if r.step is not None]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(rounds):
        for row in live:
            if row.slow and row.times:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(1 if row.slow else steps):
                row.step()
            _sync(device)
            row.times.append(time.perf_counter() - start)
            if device.type == "cuda":
                row.peak_bytes = max(row.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
    tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
    # Every row but "dense" computes the architecture of "ours": count its FLOPs from our module.
    flops_per_token = model_flops_per_token(cfg, matmul_active_params(rows[0].module, cfg))
    results = {}
    for row in rows:
        entry = {"available": row.step is not None, "note": row.note}
        if row.step is not None:
            per_round = [(1 if row.slow else steps) * tokens_per_step / t for t in row.times]
            tps = statistics.median(per_round)
            per_token = flops_per_token
            if row.name == "dense":
                dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=0))
                per_token = model_flops_per_token(dense_cfg, matmul_active_params(row.module, dense_cfg))
            flops = per_token * tps
            entry.update(tokens_per_sec=tps, spread=(max(per_round) - min(per_round)) / tps,
                         model_tflops=flops / 1e12, peak_memory_bytes=row.peak_bytes,
                         mfu=flops / (peak_tflops * 1e12) if peak_tflops else None)
        results[row.name] = entry
    return results


def gemm_efficiency(cfg: Config, device: torch.device, reps: int = 10) -> dict:
    """The experts' grouped GEMM against one dense GEMM of the same FLOPs (issue 9's "grouped GEMM >= 75 % of a
    dense GEMM's TFLOP/s"), forward and backward of one expert projection at the config's shapes, in its
    compute dtype.

    Grouped: ``torch._grouped_mm`` over N = micro-batch x sequence x K rows split among E experts as routing
    at initialisation splits them (uniform draws, seeded), each group padded to the row alignment the model
    uses on this device (:func:`expert_row_alignment`; the padding is charged to the grouped GEMM), with
    weights [E, hidden, expert ffn]. Dense: [N, hidden] @ [hidden, expert ffn]. Both count 6 N H F FLOPs
    (forward 2 NHF, input and weight gradients 4 NHF). Returns TFLOP/s of each (median of ``reps`` timed
    repetitions after two warm-ups) and their ratio."""
    from megatron_moe.model.moe import expert_row_alignment

    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    n = cfg.training.micro_batch_size * cfg.data.seq_length * cfg.moe.topk
    e, h, f = cfg.moe.num_experts, cfg.model.hidden_size, cfg.expert_ffn_size
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.randint(0, e, (n,), generator=g), minlength=e)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
        align = expert_row_alignment(0, torch.empty(0, device=device))
    padded = (counts + align - 1) // align * align
    offsets = torch.cumsum(padded, 0).to(torch.int32).to(device)

    def tensor(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(device, dtype).requires_grad_()

    x, w = tensor(int(padded.sum()), h), tensor(e, h, f)
    xd, wd = tensor(n, h), tensor(h, f)
    grad, grad_d = torch.randn(x.shape[0], f, generator=g).to(device, dtype), torch.randn(n, f, generator=g).to(
        device, dtype)

    def grouped() -> None:
        torch._grouped_mm(x, w, offs=offsets).backward(grad)

    def dense() -> None:
        (xd @ wd).backward(grad_d)

    flops = 6 * n * h * f
    out = {}
    for name, fn in (("grouped", grouped), ("dense", dense)):
        fn()
        fn()
        times = []
        for _ in range(reps):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        out[f"{name}_tflops"] = flops / statistics.median(times) / 1e12
    out.update(ratio=out["grouped_tflops"] / out["dense_tflops"], rows=n, padded_rows=int(padded.sum()),
               experts=e, hidden=h, ffn=f, dtype=str(dtype).removeprefix("torch."))
    return out


def ratios(results: dict) -> dict[str, float]:
    """The comparisons the targets name, from the same run."""
    def tps(name):
        entry = results.get(name, {})
        return entry.get("tokens_per_sec")

    pairs = {"ours / hf-grouped": ("ours", "hf-grouped"), "ours / hf-eager": ("ours", "hf-eager"),
             "ours / torchtitan": ("ours", "torchtitan"), "MoE / dense (equal active)": ("ours", "dense"),
             "sparsemixer / topk": ("sparsemixer", "ours"), "grouped GEMM / expert loop": ("ours", "expert-loop"),
             "bf16 / fp32": ("bf16", "ours") if "bf16" in results else ("ours", "fp32"),
             "compile / eager": ("compile", "ours")}
    return {k: tps(a) / tps(b) for k, (a, b) in pairs.items() if tps(a) and tps(b)}


def print_table(shape: str, cfg: Config, results: dict, device: torch.device, gemm: dict | None = None) -> None:
    m, e = cfg.model, cfg.moe
    print(f"\n== {shape}: hidden {m.hidden_size}, {m.num_layers} layers, {e.num_experts} experts top-{e.topk} "
          f"(ffn {cfg.expert_ffn_size}), seq {cfg.data.seq_length}, batch {cfg.training.global_batch_size}, {device}")
    print(f"{'row':<17}{'tokens/s':>11}{'spread':>8}{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}  note")
    for name, r in results.items():
        if not r["available"]:
            print(f"{name:<17}{'-':>11}{'-':>8}{'-':>9}{'-':>7}{'-':>10}  {r['note']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "n/a"
        spread, tps = f"{100 * r['spread']:.0f}%", r["tokens_per_sec"]
        print(f"{name:<17}{tps:>11.0f}{spread:>8}{r['model_tflops']:>9.3f}{mfu:>7}{mem:>10}  {r['note']}")
    for k, v in ratios(results).items():
        print(f"  {k:<30} {v:.2f}x")
    if gemm:
        print(f"  {'grouped GEMM / dense GEMM':<30} {gemm['ratio']:.2f}x  (one expert projection, forward + backward, "
              f"{gemm['dtype']}, equal FLOPs: {gemm['grouped_tflops']:.3f} vs {gemm['dense_tflops']:.3f} TFLOP/s; "
              f"{gemm['rows']} rows over {gemm['experts']} experts)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a TOML config to bench (default: examples/bench_h100.toml on CUDA, the "
                   "built-in small and large shapes on CPU)")
    p.add_argument("--rows", nargs="*", help="only these rows besides 'ours' (names in the module docstring)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps per row and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: H100/H200 bf16 when detected)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--bf16", action="store_true", help="bench the shapes with training.bf16 (\"ours\" in bf16)")
    p.add_argument("--out", default="runs/bench/throughput.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed_from_env(device.type, single_process=True)  # bf16 rows work through torch.distributed
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    default = str(Path(__file__).parents[1] / "examples/bench_h100.toml") if device.type == "cuda" else None
    config = args.config or default
    shapes = {Path(config).stem: ["--config", config]} if config else CPU_SHAPES
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_tflops": peak, "shapes": {}}
    for shape, flags in shapes.items():
        cfg, _ = parse_args(flags + ["--training.device", device.type, "--lr", "1e-4", "--min-lr", "1e-5"]
                            + (["--bf16"] if args.bf16 else []))
        results = run(cfg, device, args.warmup, args.steps, args.rounds, set(args.rows) if args.rows else None, peak)
        gemm = gemm_efficiency(cfg, device) if cfg.moe.num_experts else None
        print_table(shape, cfg, results, device, gemm)
        report["shapes"][shape] = {"config": cfg.to_dict(), "results": results, "ratios": ratios(results),
                                   "gemm": gemm}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
