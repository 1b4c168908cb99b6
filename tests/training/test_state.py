import torch

from megatron_moe.training.checkpoint import resolve_checkpoint, save_checkpoint
from megatron_moe.training.state import load_model_only, load_training_state, training_state


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def step(model, opt):
    x = torch.randn(5, 6)  # draws from the global generator: resume must restore it
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_resume_continues_bitwise(tmp_path):
    model, opt = make()
    for _ in range(3):
        step(model, opt)
    coeffs = torch.tensor([0.01, 0.005])
    save_checkpoint(tmp_path, 3, training_state([model], opt, 3, 96, coeffs, 0, torch.device("cpu")), {})
    for _ in range(2):
        step(model, opt)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2 = make(seed=99)  # different weights, fresh optimizer, different generator state
    info = load_training_state(resolve_checkpoint(tmp_path), [model2], opt2, 2, 0, torch.device("cpu"),
                               same_layout=True)
    assert info["step"] == 3 and info["consumed_samples"] == 96 and info["rng_restored"]
    torch.testing.assert_close(info["aux_coefficients"], coeffs, rtol=0, atol=0)
    for _ in range(2):
        step(model2, opt2)
    for a, b in zip(expected, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_other_layout_skips_rng_and_model_only_load(tmp_path):
    model, opt = make()
    step(model, opt)
    save_checkpoint(tmp_path, 1, training_state([model], opt, 1, 8, None, 0, torch.device("cpu")), {})
    model2, opt2 = make(seed=5)
    info = load_training_state(resolve_checkpoint(tmp_path), [model2], opt2, 0, 3, torch.device("cpu"),
                               same_layout=False)
    assert not info["rng_restored"] and info["aux_coefficients"] is None
    model3, _ = make(seed=7)
    load_model_only(resolve_checkpoint(tmp_path), [model3])
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incompatible_config_names_the_settings():
    import copy
    import dataclasses

    import pytest

    from megatron_moe.config import Config
    from megatron_moe.training.checkpoint import CheckpointError
    from megatron_moe.training.checkpointing import LoadedCheckpoint, resolve_vocab_size
    from megatron_moe.training.state import check_compatible

    saved = Config()
    saved.model.vocab_size, saved.moe.num_experts = 256, 16
    cfg = Config()
    cfg.moe.num_experts = 16
    resolved = resolve_vocab_size(cfg, 200, LoadedCheckpoint("ckpt", {"config": dataclasses.asdict(saved)}))
    check_compatible(dataclasses.asdict(saved), resolved, "ckpt")
    assert resolved.model.vocab_size == 256  # taken from the checkpoint when not set
    assert cfg.model.vocab_size == 0  # the user's config is not changed
    cfg = resolved
    cfg.model.hidden_size, cfg.moe.num_experts = 128, 8
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 256, config 128.*moe.num_experts"):
        check_compatible(dataclasses.asdict(saved), cfg, "ckpt")
    # The head dimension, the query/key norms and the shared expert shape the tensors too (the expert bias is
    # started at zero when a checkpoint has none: tests/training/test_resume.py); a
    # --kv-channels restating hidden / heads (Megatron-LM scripts pass it) is the checkpoint's 0.
    cfg = copy.deepcopy(saved)
    cfg.model.kv_channels = 64
    check_compatible(dataclasses.asdict(saved), cfg, "ckpt")  # 256 / 4 heads = 64
    cfg.model.kv_channels, cfg.model.qk_layernorm = 128, True
    cfg.moe = dataclasses.replace(cfg.moe, shared_expert_ffn_hidden_size=64, score_function="sigmoid", expert_bias=True)
    with pytest.raises(CheckpointError) as err:
        check_compatible(dataclasses.asdict(saved), cfg, "ckpt")
    for needle in ("model.kv_channels: checkpoint 64, config 128", "model.qk_layernorm: checkpoint False, config True",
                   "moe.shared_expert_ffn_hidden_size: checkpoint 0, config 64"):
        assert needle in str(err.value)
    # latent attention: its widths shape the tensors; a latent-norm eps of 0 is norm_eps (an imported DeepSeek-V3
    # resumed with Megatron-LM's --norm-epsilon 1e-6 is the same model)
    saved.model = dataclasses.replace(saved.model, multi_latent_attention=True, qk_layernorm=True, norm_eps=1e-6,
                                      latent_norm_eps=1e-6)
    cfg = copy.deepcopy(saved)
    cfg.model.latent_norm_eps = 0.0
    check_compatible(dataclasses.asdict(saved), cfg, "ckpt")
    cfg.model.kv_lora_rank, cfg.model.latent_norm_eps = 64, 1e-5
    with pytest.raises(CheckpointError) as err:
        check_compatible(dataclasses.asdict(saved), cfg, "ckpt")
    for needle in ("model.kv_lora_rank: checkpoint 32, config 64",
                   "model.latent_norm_eps: checkpoint 1e-06, config 1e-05"):
        assert needle in str(err.value)


def test_generator_states_missing_from_the_checkpoint_are_not_requested(tmp_path, monkeypatch):
    """A CPU-saved checkpoint resumed where a CUDA generator exists too (simulated): the CPU state loads."""
    import megatron_moe.training.state as state_mod

    model, opt = make()
    step(model, opt)
    save_checkpoint(tmp_path, 1, training_state([model], opt, 1, 8, None, 0, torch.device("cpu")), {})
    expected = torch.randn(3)
    real = state_mod.rng_state
    with_cuda = lambda device: real(device) | {"cuda": torch.zeros(16, dtype=torch.uint8)}  # noqa: E731
    monkeypatch.setattr(state_mod, "rng_state", with_cuda)
    model2, opt2 = make(seed=5)
    info = load_training_state(resolve_checkpoint(tmp_path), [model2], opt2, 0, 0, torch.device("cpu"),
                               same_layout=True)
    assert info["rng_restored"] and torch.equal(torch.randn(3), expected)  # the saved CPU stream again


def test_activation_recompute_keeps_checkpoint_names(tiny_config):
    """checkpoint_wrapper renames parameters; checkpoints must not see it (resume with recompute on or off)."""
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.state import model_state, optimizer_state

    names = []
    for recompute in (False, True):
        engine = ParallelEngine(tiny_config(recompute_granularity="full" if recompute else "none"))
        module = engine.build_model()
        assert any("_checkpoint_wrapped_module" in n for n, _ in module.named_parameters()) == recompute
        opt = torch.optim.AdamW(module.parameters())
        names.append((sorted(model_state(engine.parts)), sorted(optimizer_state(engine.parts, opt, create=True))))
    assert names[0] == names[1] and names[0][0]
