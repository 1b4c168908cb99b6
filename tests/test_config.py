import pytest

from megatron_moe.config import Config, ConfigError, load_toml, parse_args


def test_defaults_validate():
    cfg, extras = parse_args([])
    assert cfg == Config() and extras == {"eval_only": False, "notes": [], "given": set()}


def test_toml_then_dotted_and_megatron_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nhidden_size = 64\nnum_attention_heads = 4\n[moe]\nrouter = "sparsemixer"\n'
                    '[data]\ndata_path = ["a", "b"]\n')
    cfg, _ = parse_args(["--config", str(path), "--model.num_layers", "3", "--tensor-model-parallel-size", "2",
                         "--num-experts", "16", "--moe-router-topk", "2", "--lr", "1e-3", "--bf16",
                         "--data-path", "0.3", "x", "0.7", "y", "--save", "out", "--eval-only"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 3
    assert cfg.moe.router == "sparsemixer" and cfg.moe.num_experts == 16 and cfg.moe.topk == 2
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.training.bf16 is True
    assert cfg.data.data_path == ["0.3", "x", "0.7", "y"] and cfg.checkpoint.save == "out"
    assert parse_args(["--eval-only"])[1]["eval_only"] is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model.hiden_size", "3"], "model.hiden_size"),
        (["--nope.x", "3"], "nope"),
        (["--model.hidden_size", "abc"], "model.hidden_size"),
        (["--training.bf16", "maybe"], "training.bf16"),
        (["--num-experts", "2", "--moe-router-topk", "3"], "moe.topk"),
        (["--model.hidden_size", "100", "--model.num_attention_heads", "3"], "model.num_attention_heads"),
        (["--model.num_query_groups", "3"], "model.num_query_groups"),
        (["--moe.router", "sparsemixer", "--moe-router-topk", "1"], "moe.topk"),
        (["--moe.router", "hash"], "moe.router"),
        (["--moe.balance_scope", "world"], "moe.balance_scope"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "optimizer.min_lr"),
        (["--data-path", "0.5", "a", "0.5"], "data.data_path"),
        (["--split", "a,b"], "data.split"),
        (["--train-iters", "0"], "training.train_iters"),
        (["--unknown-flag", "1"], "--unknown-flag"),
        (["--lr", "1", "2"], "--lr"),
    ],
)
def test_errors_name_the_setting(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_args(argv)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_size = 'big'\n")
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_toml(bad)
    bad.write_text("[model]\ncolour = 1\n")
    with pytest.raises(ConfigError, match="model.colour"):
        load_toml(bad)


def test_example_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("examples").glob("*.toml")):
        parse_args(["--config", str(path)])


def test_micro_batches_follow_megatron_rule():
    cfg = Config()
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 16
    assert cfg.training.num_microbatches(data_parallel_size=2) == 4
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.training.num_microbatches(data_parallel_size=3)


def test_global_scope_needs_the_switch_loss():
    with pytest.raises(ConfigError, match="moe.balance_scope"):
        parse_args(["--moe.balance_scope", "global", "--moe.balance_loss", "skywork"])


def test_grouped_gemm_alignment_checked_for_cuda():
    from megatron_moe.parallel.mesh import check_grouped_gemm_shapes

    cfg, _ = parse_args(["--moe.expert_ffn_hidden_size", "1000"])
    check_grouped_gemm_shapes(cfg, 4, "cpu")  # CPU: no constraint
    check_grouped_gemm_shapes(cfg, 1, "cuda")
    with pytest.raises(ConfigError, match="expert_ffn_hidden_size / tensor parallel size"):
        check_grouped_gemm_shapes(cfg, 4, "cuda")  # 250 per rank


def test_moe_settings_on_a_dense_model_are_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"moe.router, moe.topk: no effect on a dense model"):
        parse_args(["--num-experts", "0", "--moe.router", "sparsemixer", "--moe-router-topk", "2"])
    cfg, _ = parse_args(["--num-experts", "0"])  # a dense model alone is fine
    assert cfg.moe.num_experts == 0


def test_nan_and_inf_float_settings_are_refused():
    for flag in ("--clip-grad", "--lr", "--moe.aux_loss_coeff", "--moe.capacity_factor", "--rotary-base"):
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=flag.lstrip("-").replace("-", "_").split(".")[-1].replace(
                    "rotary_base", "rope_theta")):
                parse_args([flag, value])


def test_megatron_flags_that_state_the_architecture_or_tune_kernels():
    """The flags of Megatron-LM's Mixtral example that have no setting of their own here."""
    cfg, extras = parse_args([
        "--use-mcore-models", "--disable-bias-linear", "--seq-length", "256", "--max-position-embeddings", "256",
        "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
        "--group-query-attention", "--num-query-groups", "2", "--normalization", "RMSNorm",
        "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000",
        "--moe-router-load-balancing-type", "aux_loss",
        "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "1",
        "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--attention-dropout", "0.0",
        "--hidden-dropout", "0", "--ckpt-format", "torch_dist",
    ])
    assert cfg.model.tie_embeddings is False and cfg.moe.balance_loss == "switch" and cfg.model.rope_theta == 1e6
    assert any(n.startswith("--moe-grouped-gemm has no effect") for n in extras["notes"])
    noted = {n.split()[0] for n in extras["notes"]}
    assert noted == {"--use-mcore-models", "--max-position-embeddings", "--no-masked-softmax-fusion",
                     "--moe-grouped-gemm", "--moe-token-dispatcher-type", "--use-distributed-optimizer"}


def test_megatron_flags_for_missing_features_are_refused_together_with_reasons():
    with pytest.raises(ConfigError) as err:
        parse_args(["--context-parallel-size", "2", "--expert-model-parallel-size", "4", "--fp16",
                    "--moe-router-load-balancing-type", "sinkhorn", "--colour", "blue", "--swiglu", "yes"])
    message = str(err.value)
    assert message.startswith("6 problems:")
    for needle in ("context parallelism is not implemented", "no expert parallelism by design", "use --bf16",
                   "choose one of ['aux_loss', 'none']", "unknown flag --colour", "--swiglu takes no value"):
        assert needle in message, needle


def test_architecture_option_flags():
    """Megatron-LM's flags of the released models' options (LayerNorm, biases, llama3 rope scaling)."""
    cfg, _ = parse_args(["--normalization", "LayerNorm", "--add-qkv-bias", "--add-bias-linear", "--use-rope-scaling",
                         "--rope-scaling-factor", "32", "--model.lm_head_bias", "true"])
    m = cfg.model
    assert (m.normalization, m.add_qkv_bias, m.add_bias_linear, m.lm_head_bias) == ("LayerNorm", True, True, True)
    assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", 32.0)
    cfg, _ = parse_args(["--add-bias-linear", "--disable-bias-linear"])
    assert cfg.model.add_bias_linear is False
    defaults = parse_args([])[0].model
    assert (defaults.normalization, defaults.add_qkv_bias, defaults.add_bias_linear, defaults.lm_head_bias,
            defaults.rope_scaling) == ("RMSNorm", False, False, False, "none")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--normalization", "GroupNorm"], "model.normalization = 'GroupNorm'"),
    (["--model.rope_scaling", "yarn"], "model.rope_scaling = 'yarn'"),
    (["--model.lm_head_bias", "true", "--model.tie_embeddings", "true"], "untie the embeddings"),
    (["--use-rope-scaling", "--model.rope_high_freq_factor", "1"], "model.rope_high_freq_factor = 1.0 must exceed"),
    (["--use-rope-scaling", "--rope-scaling-factor", "0"], "model.rope_scaling_factor = 0.0; must be positive"),
    (["--rope-scaling-factor", "16"], "model.rope_scaling_factor: no effect without rope scaling"),
])
def test_architecture_option_errors_name_the_setting(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value)


def test_checkpoint_architecture_fills_what_was_not_given():
    from megatron_moe.config import adopt_checkpoint_architecture

    saved = Config()
    saved.model.hidden_size, saved.model.normalization, saved.model.add_bias_linear = 48, "LayerNorm", True
    saved.moe.num_experts, saved.moe.router, saved.moe.jitter_eps = 6, "sparsemixer", 0.05
    saved.training.train_iters, saved.moe.aux_loss_coeff = 7, 0.5  # training settings: never taken
    cfg, extras = parse_args(["--num-layers", "4", "--moe.jitter_eps", "0.02", "--train-iters", "3"])
    adopted = adopt_checkpoint_architecture(cfg, saved.to_dict(), extras["given"], "ckpt")
    assert (adopted.model.hidden_size, adopted.model.normalization, adopted.model.add_bias_linear) == (
        48, "LayerNorm", True)
    assert (adopted.moe.num_experts, adopted.moe.router) == (6, "sparsemixer")
    assert adopted.moe.jitter_eps == 0.02 and adopted.model.num_layers == 4  # given: kept
    assert adopted.training.train_iters == 3 and adopted.moe.aux_loss_coeff == Config().moe.aux_loss_coeff
    assert cfg.model.hidden_size == Config().model.hidden_size  # the input is not changed
    dense = Config()
    dense.moe.num_experts = 0
    cfg, extras = parse_args(["--moe-aux-loss-coeff", "0.1"])
    with pytest.raises(ConfigError, match="moe.aux_loss_coeff: no effect on a dense model"):
        adopt_checkpoint_architecture(cfg, dense.to_dict(), extras["given"], "ckpt")
    with pytest.raises(ConfigError, match="ckpt: .*model.hidden_size: expected an integer"):
        adopt_checkpoint_architecture(cfg, {"model": {"hidden_size": "wide"}}, set(), "ckpt")
    # With --load, a setting that only the checkpoint's architecture makes meaningful waits for it.
    scaled = Config()
    scaled.model.rope_scaling, scaled.model.rope_scaling_factor = "llama3", 16.0
    cfg, extras = parse_args(["--load", "ckpt", "--rope-scaling-factor", "16"])
    assert adopt_checkpoint_architecture(cfg, scaled.to_dict(), extras["given"], "ckpt").model.rope_scaling == "llama3"
    with pytest.raises(ConfigError, match="model.rope_scaling_factor: no effect without rope scaling"):
        adopt_checkpoint_architecture(cfg, Config().to_dict(), extras["given"], "ckpt")
