import types

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_moe.config import LR_WSD_DECAY_STYLES, Config, ConfigError, OptimizerConfig
from megatron_moe.training.optim import build_optimizer, learning_rate


def _config(**settings) -> Config:
    cfg = Config()
    for group in ("optimizer", "training"):
        for name, value in settings.items():
            if hasattr(getattr(cfg, group), name):
                setattr(getattr(cfg, group), name, value)
    cfg.validate()
    return cfg


def _megatron_lrs(cfg: Config, steps: int, group: dict | None = None) -> list[float]:
    """The learning rate of each iteration under megatron-core's own OptimizerParamScheduler, built
    as Megatron-LM's training.get_optimizer_param_scheduler builds it, stepped by one global batch
    per iteration as its train loop does; ``group``: the param group's own ``max_lr`` / ``min_lr``
    (what megatron-core's optimizer sets for --decoupled-lr's input and output layers)."""
    o, t = cfg.optimizer, cfg.training
    if t.train_samples:
        decay = o.lr_decay_samples or t.train_samples
        wsd = o.lr_wsd_decay_samples or None
        warmup = o.lr_warmup_fraction * decay if o.lr_warmup_fraction else o.lr_warmup_samples
    else:
        decay = (o.lr_decay_iters or t.train_iters) * t.global_batch_size
        wsd = o.lr_wsd_decay_iters * t.global_batch_size if o.lr_wsd_decay_iters else None
        warmup = o.lr_warmup_fraction * decay if o.lr_warmup_fraction else o.lr_warmup_iters * t.global_batch_size
    optimizer = types.SimpleNamespace(param_groups=[dict(group or {})])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters * t.global_batch_size, wd_incr_style="constant",
        wsd_decay_steps=wsd, lr_wsd_decay_style=o.lr_wsd_decay_style)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(t.global_batch_size)
    return lrs


SCHEDULES = {
    "warmup+cosine": dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="cosine", train_iters=110),
    "linear, decay shorter than the run": dict(lr=2.0, min_lr=0.5, lr_warmup_iters=3, lr_decay_iters=40,
                                               lr_decay_style="linear", train_iters=60),
    "constant with warmup from init": dict(lr=1.0, lr_warmup_iters=7, lr_warmup_init=0.25,
                                           lr_decay_style="constant", train_iters=30),
    "no warmup": dict(lr=1.0, min_lr=0.0, lr_decay_style="cosine", train_iters=20),
    "inverse-square-root": dict(lr=1.0, min_lr=0.05, lr_warmup_iters=5, lr_decay_style="inverse-square-root",
                                train_iters=80),
    "warmup fraction (not a whole step)": dict(lr=1.0, min_lr=0.1, lr_warmup_fraction=0.013, lr_decay_style="cosine",
                                               train_iters=300, global_batch_size=3),
    "sample-based": dict(lr=1.0, min_lr=0.1, train_samples=1001, global_batch_size=8, train_iters=125,
                         lr_warmup_samples=50, lr_decay_samples=900, lr_decay_style="cosine"),
    "sample-based, fraction": dict(lr=1.0, train_samples=1000, global_batch_size=16, train_iters=62,
                                   lr_warmup_fraction=0.1),
    **{f"WSD {style}": dict(lr=1.0, min_lr=0.01, lr_warmup_iters=5, lr_decay_style="WSD", lr_wsd_decay_style=style,
                            lr_wsd_decay_iters=30, train_iters=100, global_batch_size=4)
       for style in LR_WSD_DECAY_STYLES},
    "WSD sample-based": dict(lr=1.0, lr_decay_style="WSD", lr_wsd_decay_samples=100, train_samples=640,
                             global_batch_size=8, train_iters=80, lr_warmup_fraction=0.05),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_equals_megatron_optimizer_param_scheduler(name):
    """Every iteration's lr (and a few beyond the run) equals megatron-core's scheduler to 1e-12."""
    cfg = _config(**SCHEDULES[name])
    steps = cfg.training.train_iters + 5
    ours = [learning_rate(step, cfg) for step in range(steps)]
    assert ours == pytest.approx(_megatron_lrs(cfg, steps), rel=1e-12, abs=1e-15)


def test_first_step_of_a_warmup_uses_the_initial_lr():
    """Megatron-LM's first iteration trains at lr_warmup_init (0 by default), not one warmup step in."""
    cfg = _config(lr=1.0, lr_warmup_iters=10, train_iters=20)
    assert learning_rate(0, cfg) == 0.0 and learning_rate(10, cfg) == 1.0
    assert learning_rate(5, cfg) == pytest.approx(0.5)
    whole = _config(lr=1.0, min_lr=0.1, lr_warmup_iters=4, train_iters=4)  # warmup over the whole run
    assert [learning_rate(s, whole) for s in range(6)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.1])


@pytest.mark.parametrize("settings, needle", [
    (dict(lr_warmup_iters=21, train_iters=20), "warmup"),
    (dict(lr_warmup_samples=5, train_iters=20), "lr_warmup_samples"),
    (dict(lr_decay_iters=5, train_samples=80, train_iters=10), "lr_decay_iters"),
    (dict(lr_warmup_iters=2, lr_warmup_fraction=0.1, train_iters=20), "lr_warmup_fraction"),
    (dict(lr_decay_style="WSD", train_iters=20), "lr_wsd_decay_iters"),
    (dict(lr_warmup_init=1.0, lr=0.5), "lr_warmup_init"),
])
def test_schedule_settings_megatron_refuses_are_refused(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(**settings)


def test_no_weight_decay_on_norms_and_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.5))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("decoupled_min_lr", [-1.0, 0.02], ids=["min_lr", "own"])
@pytest.mark.parametrize("name", ["warmup+cosine", "WSD linear", "inverse-square-root"])
def test_decoupled_lr_equals_megatrons_scheduler_for_the_input_and_output_layers(name, decoupled_min_lr):
    """--decoupled-lr / --decoupled-min-lr (unset: optimizer.min_lr, as Megatron-LM): the input and output
    layers' rate equals megatron-core's scheduler on a group with those max_lr / min_lr; the rest keep
    the main schedule."""
    cfg = _config(**SCHEDULES[name], decoupled_lr=3.0, decoupled_min_lr=decoupled_min_lr)
    steps = cfg.training.train_iters + 5
    bottom = cfg.optimizer.min_lr if decoupled_min_lr < 0 else decoupled_min_lr
    theirs = _megatron_lrs(cfg, steps, {"max_lr": 3.0, "min_lr": bottom})
    assert [learning_rate(s, cfg, decoupled=True) for s in range(steps)] == pytest.approx(theirs, rel=1e-12,
                                                                                          abs=1e-15)
    assert [learning_rate(s, cfg) for s in range(steps)] == pytest.approx(_megatron_lrs(cfg, steps), rel=1e-12,
                                                                           abs=1e-15)


def test_decoupled_lr_moves_only_the_embedding_and_output_layer_at_its_rate():
    """One AdamW step: with --decoupled-lr 0 the embedding and output head do not move and every other
    parameter does; with the decoupled rate equal to the main one the step is the undecoupled step."""
    from megatron_moe.model.transformer import build_model
    from megatron_moe.training.optim import set_learning_rate
    from tests.builders import tiny_config

    def one_step(**optimizer_settings) -> tuple[dict, dict]:
        cfg = tiny_config()
        cfg.optimizer.lr, cfg.optimizer.lr_decay_style = 1e-2, "constant"
        for k, v in optimizer_settings.items():
            setattr(cfg.optimizer, k, v)
        cfg.validate()
        torch.manual_seed(0)
        model = build_model(cfg, "cpu")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, cfg.optimizer)
        set_learning_rate(opt, 0, cfg)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        opt.step()
        return before, {n: p.detach().clone() for n, p in model.named_parameters()}

    before, after = one_step(decoupled_lr=0.0)
    io = {n for n in before if n.startswith(("tok_embeddings.", "output."))}
    assert io == {"tok_embeddings.weight", "output.weight"}
    for n in before:
        assert torch.equal(before[n], after[n]) == (n in io), n
    _, same = one_step(decoupled_lr=1e-2)
    _, plain = one_step()
    assert all(torch.equal(same[n], plain[n]) for n in plain)


def test_decoupled_min_lr_without_decoupled_lr_is_refused():
    with pytest.raises(ConfigError, match="decoupled_min_lr"):
        _config(decoupled_min_lr=0.1)
