import pytest
import torch

from megatron_moe.model.moe import moe_layers
from megatron_moe.model.transformer import build_model
from megatron_moe.parallel.engine import ParallelEngine, StepResult
from megatron_moe.parallel.loss import lm_loss_from_target, loss_target

SMALL = dict(vocab_size=96, num_layers=3, ffn_hidden_size=48, expert_ffn_hidden_size=16, aux_loss_coeff=0.01,
             z_loss_coeff=0.0, micro=4, global_batch=8)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats) over unmasked positions. logits [B,S,V], labels/0-1 mask [B,S]."""
    return lm_loss_from_target(logits, loss_target(labels, loss_mask))


def train_step(model, batches: list[dict], optimizer, clip_grad: float) -> StepResult:
    """One optimizer step of a single-process ``model`` over ``batches`` through the engine."""
    engine = ParallelEngine(model.cfg, device=next(model.parameters()).device)
    engine.build_model(model=model, seed_rng=False)
    return engine.train_step(batches, optimizer, clip_grad)


class RecordingOptimizer:
    """Stands in for AdamW: records the gradients it would apply."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def batch(tokens):
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones_like(tokens[:, 1:]).float()}


def test_lm_loss_matches_masked_mean_reference():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)
    logp = logits.log_softmax(-1)
    ref = -sum(logp[b, s, labels[b, s]] * mask[b, s] for b in range(2) for s in range(5)) / mask.sum()
    torch.testing.assert_close(lm_loss(logits, labels, mask), ref.float(), rtol=1e-6, atol=1e-6, check_dtype=False)


def test_gradient_accumulation_equals_one_big_batch_without_aux(tiny_config):
    cfg = tiny_config(**SMALL, balance_loss="none")
    tokens = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for split in ([tokens], [tokens[:2], tokens[2:]]):
        model = build_model(cfg, seed=3).eval()  # eval: deterministic routing, same function for both
        opt = RecordingOptimizer(model)
        out = train_step(model, [batch(t) for t in split], opt, clip_grad=0.0)
        results.append((out.lm_loss, opt.grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_aux_losses_are_averaged_over_micro_batches(tiny_config):
    cfg = tiny_config(**{**SMALL, "aux_loss_coeff": 0.3, "z_loss_coeff": 0.05})
    tokens = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(1))
    micro = [batch(tokens[:2]), batch(tokens[2:])]
    model = build_model(cfg, seed=5).eval()
    opt = RecordingOptimizer(model)
    out = train_step(model, micro, opt, clip_grad=0.0)
    # Reference: explicit mean over micro-batches of (lm + sum of layer aux), aux formed by hand.
    model.zero_grad()
    for layer in moe_layers(model):
        layer.set_aux_loss_scale(0.0)
    total, total_aux = 0.0, 0.0
    for b in micro:
        aux_terms: list = []
        hooks = [layer.router.register_forward_hook(lambda m, i, o, acc=aux_terms: acc.append(o))
                 for layer in moe_layers(model)]
        loss = lm_loss(model(b["tokens"]), b["labels"], b["loss_mask"])
        for h in hooks:
            h.remove()
        aux = 0.0
        for route in aux_terms:
            f = torch.bincount(route.indices.flatten(), minlength=4).float() / route.indices.numel()
            aux = aux + 0.3 * 4 * (f * route.probs.mean(0)).sum()
            aux = aux + 0.05 * (torch.logsumexp(route.logits, -1) ** 2).mean()
        ((loss + aux) / 2).backward()
        total, total_aux = total + loss.detach() / 2, total_aux + aux.detach() / 2
    torch.testing.assert_close(out.lm_loss, total)
    torch.testing.assert_close(out.aux_loss, total_aux, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer_kind", ["fused-adamw", "sgd"])
def test_a_nonfinite_gradient_with_a_finite_loss_is_never_applied(tiny_config, optimizer_kind):
    """The issue's case: finite loss, NaN gradient norm; neither the weights nor the optimizer state move."""
    from megatron_moe.training.optim import build_optimizer

    cfg = tiny_config(**SMALL)
    model = build_model(cfg, seed=3).train()
    engine = ParallelEngine(cfg)
    engine.build_model(model=model, seed_rng=False)
    if optimizer_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = build_optimizer(model, cfg.optimizer)
    tokens = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(2))
    good = engine.train_step([batch(tokens[:2]), batch(tokens[2:])], opt, clip_grad=1.0)
    assert bool(good.finite)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    hook = model.layers["1"].attention.wq.weight.register_hook(lambda g: g * float("nan"))
    bad = engine.train_step([batch(tokens[:2]), batch(tokens[2:])], opt, clip_grad=1.0)
    hook.remove()
    assert torch.isfinite(bad.lm_loss) and not torch.isfinite(bad.grad_norm) and not bool(bad.finite)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[n][k]), (n, k)
    assert bool(engine.train_step([batch(tokens[:2]), batch(tokens[2:])], opt, clip_grad=1.0).finite)
    assert not torch.equal(model.layers["1"].attention.wq.weight, before["layers.1.attention.wq.weight"])


def test_token_ids_beyond_the_vocabulary_are_a_clear_error(tiny_config):
    cfg = tiny_config(**SMALL)
    engine = ParallelEngine(cfg)
    engine.build_model()
    tokens = torch.full((2, 17), 96)  # vocab_size is 96: ids 0..95
    with pytest.raises(ValueError, match="token id 96, but model.vocab_size is 96"):
        engine.train_step([batch(tokens)], torch.optim.SGD(engine.parameters(), lr=0.1), clip_grad=0.0)
    tokens = torch.zeros((2, 17), dtype=torch.long)
    tokens[:, -1] = 97  # only in the labels (the last position is never an input)
    with pytest.raises(ValueError, match="token id 97, but model.vocab_size is 96"):
        engine.train_step([batch(tokens)], torch.optim.SGD(engine.parameters(), lr=0.1), clip_grad=0.0)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it applies (the engine clears them after the step)."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None]
        return super().step(closure)


def test_params_norm_and_zeros_in_grad_match_float64_and_naive_references(tiny_config):
    """--log-params-norm: the norm of the parameters AFTER the step (as Megatron-LM computes it after
    train_step), against float64 over all parameters; 1e-6 relative (fp32 per-tensor norms, ~1e-7).
    --log-num-zeros-in-grad: exactly the naive count of ``grad == 0`` over the applied gradients. Only
    tokens < 48 occur, so the embedding rows 48..95 get exactly zero gradients (and count)."""
    cfg = tiny_config(**SMALL)
    cfg.logging.log_params_norm = cfg.logging.log_num_zeros_in_grad = True
    tokens = torch.randint(0, 48, (4, 17), generator=torch.Generator().manual_seed(2))
    model = build_model(cfg, seed=4)
    before = torch.linalg.vector_norm(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    opt = RecordingSGD(model.parameters(), lr=0.5)
    out = train_step(model, [batch(tokens[:2]), batch(tokens[2:])], opt, clip_grad=0.0)
    after = torch.linalg.vector_norm(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    assert abs(after - before) / after > 1e-4  # the step moves the norm far more than the tolerance
    assert out.params_norm.item() == pytest.approx(after.item(), rel=1e-6)
    zeros = sum(int((g == 0).sum()) for g in opt.grads)
    assert zeros >= 48 * cfg.model.hidden_size  # the unused embedding rows at least
    assert out.num_zeros_in_grad.item() == zeros


def test_params_norm_and_zeros_in_grad_are_not_computed_unless_asked(tiny_config):
    model = build_model(tiny_config(**SMALL), seed=4)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    out = train_step(model, [batch(tokens)], torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=1.0)
    assert out.params_norm is None and out.num_zeros_in_grad is None
