import re
import shlex
from pathlib import Path

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

    cfg, _ = parse_args(["--num-experts", "8", "--moe.expert_ffn_hidden_size", "1000"])
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
        "--num-experts", "8", "--moe-router-load-balancing-type", "aux_loss",
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
                   "choose one of ['aux_loss', 'none', 'seq_aux_loss']", "unknown flag --colour",
                   "--swiglu takes no value"):
        assert needle in message, needle


@pytest.mark.parametrize(("expression", "layers"), [
    ("[0]*3+[1]*5", 8),  # DeepSeek-V3's form: k dense layers, then all MoE
    ("([0,1]*4)", 8),  # Llama-4-Maverick's: every other layer, the first dense
    ("[1,0,0]*2", 6),  # Megatron's integer form 3 (i % 3 == 0)
    ("[0,0,1]", 3),  # a single MoE layer, the last
    ("[0] * 2 + [1, 0] * 3", 8),
])
def test_megatron_list_form_of_moe_layer_freq_places_the_same_moe_layers(expression, layers):
    from megatron_moe.model.transformer import is_moe_layer

    cfg, _ = parse_args(["--num-layers", str(layers), "--num-experts", "4", "--moe-layer-freq", expression])
    expected = eval(expression)  # the reference: Python's own evaluation of Megatron-LM's expression
    assert [int(is_moe_layer(cfg, i)) for i in range(layers)] == expected


@pytest.mark.parametrize(("expression", "needle"), [
    ("[1,0,0,1,1,0,0,0]", "MoE layers [0, 3, 4] are not that"),
    ("[0]*3+[1]*4", "7 entries for --num-layers 8"),
    ("[0]*8", "no MoE layer"),
    ("[0,2]*4", "list entries must be 0 or 1"),
    ("[0]*(__import__('os').getpid())", "is not allowed"),
    ("[0,1]*10**9", "is not allowed"),
    ("[0,1", "not an expression"),
    ("+".join(["[0]*100000"] * 2), "more than 100000 entries"),  # each * within bounds, the sum not
    ("[0]" + "+[0]" * 300, "1203 characters; at most 1000"),
    ("(" * 200 + "[1]" + ")" * 200, "not an expression"),  # deeper than Python's parser nests
])
def test_moe_layer_patterns_that_do_not_fit_are_refused_naming_the_flag(expression, needle):
    with pytest.raises(ConfigError, match="--moe-layer-freq") as err:
        parse_args(["--num-layers", "8", "--num-experts", "4", "--moe-layer-freq", expression])
    assert needle in str(err.value)


def test_moe_layer_freq_last_given_counts_and_sharding_strategy_no_shard_changes_nothing():
    """As Megatron-LM's argparse: a later --moe-layer-freq replaces an earlier one in either form; no_shard (its
    default strategy, written out by scripts) leaves --use-torch-fsdp2 on whatever the order."""
    base = ["--num-layers", "4", "--num-experts", "4"]
    cfg, _ = parse_args(base + ["--moe-layer-freq", "[1,0,1,0]", "--moe-layer-freq", "1"])
    assert (cfg.moe.first_k_dense, cfg.moe.layer_freq) == (0, 1)
    cfg, _ = parse_args(base + ["--moe-layer-freq", "1", "--moe-layer-freq", "2*[0,1]"])  # '[' anywhere: a list
    assert (cfg.moe.first_k_dense, cfg.moe.layer_freq) == (1, 2)
    cfg, _ = parse_args(["--bf16", "--megatron-fsdp-grad-comm-dtype", "bf16", "--megatron-fsdp-main-grads-dtype",
                         "fp32", "--megatron-fsdp-main-params-dtype", "auto"])
    assert cfg.parallel.grad_reduce_in_bf16 and cfg.training.bf16
    with pytest.raises(ConfigError, match="--megatron-fsdp-main-grads-dtype bf16: not available here; choose one"):
        parse_args(["--megatron-fsdp-main-grads-dtype", "bf16"])
    for argv in (["--use-torch-fsdp2", "--data-parallel-sharding-strategy", "no_shard"],
                 ["--data-parallel-sharding-strategy", "no_shard", "--use-torch-fsdp2"]):
        assert parse_args(argv)[0].parallel.data_parallel_shard
    assert not parse_args(["--data-parallel-sharding-strategy", "no_shard"])[0].parallel.data_parallel_shard


def test_qwen3_30b_a3b_megatron_arguments_give_the_example_model():
    """Qwen3-30B-A3B's Megatron-LM model arguments as a launch script passes them (slime's, a bash array
    expanded unquoted: the quotes of --moe-layer-freq arrive in the value) build the model of
    examples/qwen3_30b_a3b.toml; the dispatcher and kernel flags are notes."""
    argv = shlex.split("""--disable-bias-linear --qk-layernorm --group-query-attention --num-attention-heads 32
        --num-query-groups 4 --kv-channels 128 --num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144
        --normalization RMSNorm --position-embedding-type rope --norm-epsilon 1e-6 --rotary-percent 1.0 --swiglu
        --untie-embeddings-and-output-weights --vocab-size 151936 --rotary-base 1000000 --moe-ffn-hidden-size 768
        --moe-router-score-function softmax --moe-token-dispatcher-type alltoall --moe-router-topk 8
        --moe-layer-freq "'([1]*48)'" --num-experts 128 --moe-grouped-gemm --moe-token-drop-policy probs
        --moe-router-dtype fp32 --moe-permute-fusion --moe-aux-loss-coeff 0""")
    cfg, extras = parse_args(argv)
    example, _ = parse_args(["--config", str(Path(__file__).parents[1] / "examples" / "qwen3_30b_a3b.toml")])
    assert cfg.model == example.model
    for key in ("num_experts", "topk", "expert_ffn_hidden_size", "router", "renormalize", "layer_freq",
                "first_k_dense"):
        assert getattr(cfg.moe, key) == getattr(example.moe, key), key
    assert any("--moe-token-dispatcher-type" in note for note in extras["notes"])


def test_multi_token_prediction_flags():
    """Megatron-LM's --mtp-num-layers / --mtp-loss-scaling-factor are DeepSeek-V3's multi-token prediction depths
    and lambda; pipeline stages take them (the last stage holds a copy of the embedding)."""
    from megatron_moe.parallel.mesh import parallel_sizes

    cfg, _ = parse_args(["--mtp-num-layers", "2", "--mtp-loss-scaling-factor", "0.3", "--num-experts", "4"])
    assert (cfg.model.mtp_num_layers, cfg.training.mtp_loss_scaling_factor) == (2, 0.3)
    cfg, _ = parse_args(["--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2", "--global-batch-size", "8"])
    assert parallel_sizes(cfg, 2).pp == 2
    with pytest.raises(ConfigError, match="model.mtp_num_layers = -1; must not be negative"):
        parse_args(["--mtp-num-layers", "-1"])


def test_moonlight_megatron_arguments_give_the_example_model():
    """Moonlight-16B-A3B's Megatron-LM model arguments as a launch script passes them (slime's: --kv-channels,
    YaRN's mscales at factor 1, pre-softmax with sigmoid scores, one group of experts, the layer list expanded
    unquoted into words) build the model of examples/moonlight_16b_a3b.toml, but for the latent norms' eps,
    which megatron-core takes from --norm-epsilon (the example keeps transformers' 1e-6)."""
    argv = shlex.split("""--disable-bias-linear --num-layers 27 --hidden-size 2048 --ffn-hidden-size 11264
        --num-attention-heads 16 --kv-channels 128 --normalization RMSNorm --position-embedding-type rope
        --norm-epsilon 1e-5 --rotary-percent 1.0 --swiglu --untie-embeddings-and-output-weights
        --no-masked-softmax-fusion --vocab-size 163840 --multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128
        --qk-pos-emb-head-dim 64 --v-head-dim 128 --qk-layernorm --rotary-scaling-factor 1 --rotary-base 50000
        --mscale 1.0 --mscale-all-dim 1.0 --attention-softmax-in-fp32 --no-rope-fusion --num-experts 64
        --moe-layer-freq [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        --moe-ffn-hidden-size 1408 --moe-router-topk 6 --moe-shared-expert-intermediate-size 2816
        --moe-router-pre-softmax --moe-router-score-function sigmoid --moe-router-enable-expert-bias
        --moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0
        --moe-router-bias-update-rate 0 --moe-router-group-topk 1 --moe-router-num-groups 1 --moe-grouped-gemm
        --moe-router-topk-scaling-factor 2.446 --moe-token-drop-policy probs --moe-router-dtype fp32
        --moe-permute-fusion""")
    cfg, extras = parse_args(argv)
    example, _ = parse_args(["--config", str(Path(__file__).parents[1] / "examples" / "moonlight_16b_a3b.toml")])
    assert cfg.model.latent_norm_eps == 0 and example.model.latent_norm_eps == 1e-6
    cfg.model.latent_norm_eps = example.model.latent_norm_eps
    assert cfg.model == example.model
    for key in ("num_experts", "topk", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size", "router",
                "renormalize", "layer_freq", "first_k_dense", "score_function", "expert_bias", "topk_scaling_factor",
                "balance_loss"):
        assert getattr(cfg.moe, key) == getattr(example.moe, key), key
    assert (cfg.moe.router_num_groups, cfg.moe.router_group_topk) == (1, 1)  # one group: plain top-K
    notes = {n.split()[0] for n in extras["notes"]}
    assert notes >= {"--kv-channels", "--mscale,", "--moe-router-pre-softmax"}


def test_renamed_settings_of_older_files_and_checkpoints_read_as_their_successors(tmp_path):
    """Settings renamed since checkpoints were first written (their meta.json holds the old names) still read:
    parallel.activation_checkpointing and parallel.pipeline_first_last_fewer_layers (now Megatron-LM's two
    account-for settings)."""
    path = tmp_path / "old.toml"
    path.write_text("[parallel]\npipeline_model_parallel_size = 2\nactivation_checkpointing = true\n"
                    "pipeline_first_last_fewer_layers = true\n")
    cfg, _ = parse_args(["--config", str(path)])
    p = cfg.parallel
    assert p.recompute_granularity == "full"
    assert p.account_for_embedding_in_pipeline_split and p.account_for_loss_in_pipeline_split


def test_glm45_air_megatron_arguments_give_the_example_model():
    """GLM-4.5-Air's Megatron-LM model arguments as slime passes them (--rotary-percent 0.5, q/k/v biases, 128-wide
    heads on hidden 4096, a frozen expert bias: rate 0) build the model of examples/glm45_air.toml, but for its
    depth of multi-token prediction, which those arguments leave out."""
    argv = shlex.split("""--disable-bias-linear --group-query-attention --num-attention-heads 96 --num-query-groups 8
        --kv-channels 128 --num-layers 46 --hidden-size 4096 --ffn-hidden-size 10944 --add-qkv-bias
        --normalization RMSNorm --position-embedding-type rope --rotary-percent 0.5 --swiglu
        --untie-embeddings-and-output-weights --vocab-size 151552 --rotary-base 1000000 --moe-ffn-hidden-size 1408
        --moe-shared-expert-intermediate-size 1408 --moe-router-pre-softmax --moe-router-score-function sigmoid
        --moe-router-enable-expert-bias --moe-router-bias-update-rate 0 --moe-router-load-balancing-type seq_aux_loss
        --moe-token-dispatcher-type alltoall --moe-router-topk 8 --moe-layer-freq [0]*1+[1]*45 --num-experts 128
        --moe-grouped-gemm --moe-router-dtype fp32 --moe-permute-fusion --moe-aux-loss-coeff 0""")
    cfg, _ = parse_args(argv)
    example, _ = parse_args(["--config", str(Path(__file__).parents[1] / "examples" / "glm45_air.toml")])
    assert (cfg.model.mtp_num_layers, example.model.mtp_num_layers) == (0, 1)
    cfg.model.mtp_num_layers = 1
    assert cfg.model == example.model
    for key in ("num_experts", "topk", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size", "router",
                "renormalize", "layer_freq", "first_k_dense", "score_function", "expert_bias", "topk_scaling_factor",
                "balance_loss"):
        assert getattr(cfg.moe, key) == getattr(example.moe, key), key
    assert cfg.moe.expert_bias_update_rate == 0 and example.moe.expert_bias_update_rate > 0


def test_sigmoid_routing_flags():
    """DeepSeek-V3's router flags as its Megatron-LM script passes them (pre-softmax included, which megatron-core
    ignores for sigmoid scores); a bias update rate without the bias, the bias without sigmoid scores, and
    sigmoid scores with SparseMixer-v2 are errors naming the settings."""
    cfg, extras = parse_args(["--num-experts", "8", "--moe-router-score-function", "sigmoid",
                              "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3",
                              "--moe-router-topk-scaling-factor", "2.5", "--moe-router-pre-softmax"])
    e = cfg.moe
    assert (e.score_function, e.expert_bias, e.expert_bias_update_rate, e.topk_scaling_factor) == ("sigmoid", True,
                                                                                                   1e-3, 2.5)
    assert e.renormalize and any("--moe-router-pre-softmax has no effect" in n for n in extras["notes"])
    assert parse_args(["--num-experts", "8", "--moe-router-pre-softmax"])[0].moe.renormalize is False  # softmax
    grouped = parse_args(["--num-experts", "8", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"])[0]
    assert (grouped.moe.router_num_groups, grouped.moe.router_group_topk) == (4, 2)
    for argv, needle in [
        (["--moe-router-bias-update-rate", "1e-2"], "moe.expert_bias_update_rate (--moe-router-bias-update-rate): "
                                                    "no effect without moe.expert_bias"),
        (["--moe-router-enable-expert-bias"], "moe.expert_bias (--moe-router-enable-expert-bias) biases sigmoid"),
        (["--moe-router-score-function", "sigmoid", "--moe.router", "sparsemixer"], "SparseMixer-v2"),
        (["--moe-router-score-function", "tanh"], "moe.score_function"),
        (["--moe-router-topk-scaling-factor", "0"], "moe.topk_scaling_factor = 0.0; must be positive"),
        (["--moe-router-num-groups", "2"], "moe.router_num_groups and moe.router_group_topk"),
        (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "moe.router_num_groups = 3 must divide"),
        (["--moe-router-num-groups", "4", "--moe-router-group-topk", "3"], "at most the groups and moe.topk = 2"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_args(["--num-experts", "8", *argv])


def test_shared_expert_flags():
    cfg, extras = parse_args(["--num-experts", "4", "--moe-shared-expert-intermediate-size", "96",
                              "--moe-shared-expert-gate", "--moe-shared-expert-overlap"])
    assert (cfg.moe.shared_expert_ffn_hidden_size, cfg.moe.shared_expert_gate) == (96, True)
    assert any("--moe-shared-expert-overlap has no effect" in note for note in extras["notes"])
    with pytest.raises(ConfigError, match=r"moe.shared_expert_gate needs a shared expert"):
        parse_args(["--num-experts", "4", "--moe-shared-expert-gate"])
    with pytest.raises(ConfigError, match=r"moe.shared_expert_ffn_hidden_size = -1; must not be negative"):
        parse_args(["--num-experts", "4", "--moe-shared-expert-intermediate-size", "-1"])
    with pytest.raises(ConfigError, match=r"moe.shared_expert_ffn_hidden_size: no effect on a dense model"):
        parse_args(["--moe-shared-expert-intermediate-size", "96"])


def test_qk_layernorm_flag():
    assert parse_args(["--qk-layernorm"])[0].model.qk_layernorm
    assert not parse_args([])[0].model.qk_layernorm


def test_recompute_modules():
    cfg, _ = parse_args(["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe", "mlp"])
    assert cfg.parallel.recompute_modules == ["core_attn", "moe", "mlp"]
    assert parse_args([])[0].parallel.recompute_modules == ["core_attn"]
    with pytest.raises(ConfigError, match="parallel.recompute_modules = 'mla_up_proj'; expected one of"):
        parse_args(["--recompute-granularity", "selective", "--recompute-modules", "moe", "mla_up_proj"])
    with pytest.raises(ConfigError, match="no effect without parallel.recompute_granularity = 'selective'"):
        parse_args(["--recompute-granularity", "full", "--recompute-modules", "moe"])
    with pytest.raises(ConfigError, match="--moe-layer-recompute is not supported: use --recompute-granularity "
                                          "selective --recompute-modules core_attn moe"):
        parse_args(["--moe-layer-recompute"])


def test_megatron_flags_of_newer_example_scripts():
    """Flags of Megatron-LM's DeepSeek-V3 / gpt-oss / Megatron-FSDP launchers: the quoted --split that a bash array
    expanded unquoted passes on, no-op values and infrastructure knobs accepted (notes), Megatron-FSDP's full
    sharding as FSDP2, and the architectures left out refused with the reason rather than as unknown flags."""
    from megatron_moe.config import parse_split

    assert parse_split("'99,1,0'") == parse_split("99,1,0") == parse_split('"99,1,0"') == [0.99, 0.01, 0.0]
    with pytest.raises(ConfigError, match="data.split = \"'99,1'0'\""):
        parse_split("'99,1'0'")
    cfg, extras = parse_args(["--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "2",
                              "--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params",
                              "--init-model-with-meta-device", "--manual-gc-interval", "10", "--logging-level", "40",
                              "--rope-type", "rope", "--mtp-num-layers", "0", "--trust-remote-code",
                              "--mtp-loss-scaling-factor", "0.1"])
    assert cfg.parallel.data_parallel_shard and cfg.training.meta_init
    assert {n.split()[0] for n in extras["notes"]} == {"--use-megatron-fsdp", "--manual-gc-interval",
                                                       "--logging-level", "--trust-remote-code"}
    assert (cfg.model.mtp_num_layers, cfg.training.mtp_loss_scaling_factor) == (0, 0.1)
    with pytest.raises(ConfigError, match="the experts' tensor-parallel size is --tensor-model-parallel-size = 2 here"):
        parse_args(["--expert-tensor-parallel-size", "1", "--tensor-model-parallel-size", "2"])
    with pytest.raises(ConfigError) as err:
        parse_args(["--data-parallel-sharding-strategy", "optim", "--multi-latent-attention", "--q-lora-rank", "1536",
                    "--rotary-scaling-factor", "40", "--mtp-num-layers", "1", "--enable-gpt-oss"])
    message = str(err.value)
    for needle in ("choose one of ['no_shard', 'optim_grads_params']", "the gpt-oss architecture is not implemented"):
        assert needle in message, needle
    assert "unknown flag" not in message


def test_multi_latent_attention_flags_of_megatrons_deepseek_scripts():
    """The attention flags of Megatron-LM's DeepSeek-V3 script (examples/megatron_fsdp), at the plain rotary
    embedding: --kv-channels, and at factor 1 YaRN's factor and mscales, are notes (Megatron-LM's latent attention
    does not read --kv-channels, and YaRN at factor 1 is the plain rotary embedding); at factor 40 they are YaRN."""
    cfg, extras = parse_args(["--multi-latent-attention", "--num-attention-heads", "128", "--hidden-size", "7168",
                              "--kv-channels", "128", "--qk-layernorm", "--q-lora-rank", "1536", "--kv-lora-rank",
                              "512", "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
                              "--rope-type", "yarn", "--rotary-scaling-factor", "1", "--mscale", "1.0",
                              "--mscale-all-dim", "1.0"])
    m = cfg.model
    assert m.multi_latent_attention and m.qk_layernorm and m.kv_channels == 0 and m.rotary_dim == 64
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (1536, 512, 128, 64,
                                                                                                   128)
    assert {n.split()[0] for n in extras["notes"]} == {"--kv-channels", "--mscale,"}  # the YaRN flags' one note
    assert m.rope_scaling == "none" and (m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim) == (1.0, 0.0)
    m = parse_args(["--multi-latent-attention", "--rotary-scaling-factor", "40", "--mscale", "1.0",
                    "--mscale-all-dim", "1.0"])[0].model
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim,
            m.rope_yarn_original_max_position) == ("yarn", 40.0, 1.0, 1.0, 4096)
    with pytest.raises(ConfigError, match="model.rope_yarn_mscale_all_dim: no effect with model.rope_scaling = 'none'"):
        parse_args(["--model.rope_yarn_mscale_all_dim", "1.0"])
    with pytest.raises(ConfigError, match="model.rope_scaling = 'llama3' .--use-rope-scaling. with model.multi_latent"):
        parse_args(["--multi-latent-attention", "--use-rope-scaling"])
    with pytest.raises(ConfigError, match="model.rope_low_freq_factor: no effect with model.rope_scaling = 'yarn'"):
        parse_args(["--model.rope_scaling", "yarn", "--model.rope_low_freq_factor", "2"])
    # as megatron-core reads them: YaRN is latent attention's (not with --rope-type rope); a llama3 factor stays
    for argv, needle in ([["--rotary-scaling-factor", "4"], "Megatron-LM applies it to latent attention"],
                         [["--multi-latent-attention", "--rope-type", "rope", "--rotary-scaling-factor", "40"],
                          "--rope-type rope with --rotary-scaling-factor 40"]):
        with pytest.raises(ConfigError, match=needle):
            parse_args(argv)
    m = parse_args(["--use-rope-scaling", "--rope-scaling-factor", "16", "--rotary-scaling-factor", "1"])[0].model
    assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", 16.0)
    with pytest.raises(ConfigError, match="training.mtp_loss_scaling_factor .--mtp-loss-scaling-factor.: no effect"):
        parse_args(["--mtp-loss-scaling-factor", "0.3"])
    with pytest.raises(ConfigError, match="model.kv_lora_rank, model.v_head_dim: no effect without multi-latent"):
        parse_args(["--kv-lora-rank", "64", "--v-head-dim", "32"])
    with pytest.raises(ConfigError, match="model.num_query_groups = 2 with model.multi_latent_attention"):
        parse_args(["--multi-latent-attention", "--num-query-groups", "2"])
    with pytest.raises(ConfigError, match="model.qk_pos_emb_head_dim = 5 must be even"):
        parse_args(["--multi-latent-attention", "--qk-pos-emb-head-dim", "5"])
    with pytest.raises(ConfigError, match="model.kv_channels = 64 with model.multi_latent_attention"):
        parse_args(["--model.multi_latent_attention", "true", "--model.kv_channels", "64"])


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
    (["--model.rope_scaling", "longrope"], "model.rope_scaling = 'longrope'"),
    (["--model.lm_head_bias", "true", "--model.tie_embeddings", "true"], "untie the embeddings"),
    (["--use-rope-scaling", "--model.rope_high_freq_factor", "1"], "model.rope_high_freq_factor = 1.0 must exceed"),
    (["--use-rope-scaling", "--rope-scaling-factor", "0"], "model.rope_scaling_factor = 0.0; must be positive"),
    (["--rope-scaling-factor", "16"], "model.rope_scaling_factor: no effect with model.rope_scaling = 'none'"),
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
    cfg, extras = parse_args(["--num-layers", "4", "--moe.jitter_eps", "0.02", "--train-iters", "3", "--load", "ckpt"])
    adopted = adopt_checkpoint_architecture(cfg, saved.to_dict(), extras["given"], "ckpt")
    assert (adopted.model.hidden_size, adopted.model.normalization, adopted.model.add_bias_linear) == (
        48, "LayerNorm", True)
    assert (adopted.moe.num_experts, adopted.moe.router) == (6, "sparsemixer")
    assert adopted.moe.jitter_eps == 0.02 and adopted.model.num_layers == 4  # given: kept
    assert adopted.training.train_iters == 3 and adopted.moe.aux_loss_coeff == Config().moe.aux_loss_coeff
    assert cfg.model.hidden_size == Config().model.hidden_size  # the input is not changed
    dense = Config()
    dense.moe.num_experts = 0
    cfg, extras = parse_args(["--moe-aux-loss-coeff", "0.1", "--load", "ckpt"])  # checked once the checkpoint is read
    with pytest.raises(ConfigError, match="moe.aux_loss_coeff: no effect on a dense model"):
        adopt_checkpoint_architecture(cfg, dense.to_dict(), extras["given"], "ckpt")
    with pytest.raises(ConfigError, match="ckpt: .*model.hidden_size: expected an integer"):
        adopt_checkpoint_architecture(cfg, {"model": {"hidden_size": "wide"}}, set(), "ckpt")
    # With --load, a setting that only the checkpoint's architecture makes meaningful waits for it.
    scaled = Config()
    scaled.model.rope_scaling, scaled.model.rope_scaling_factor = "llama3", 16.0
    cfg, extras = parse_args(["--load", "ckpt", "--rope-scaling-factor", "16"])
    assert adopt_checkpoint_architecture(cfg, scaled.to_dict(), extras["given"], "ckpt").model.rope_scaling == "llama3"
    with pytest.raises(ConfigError, match="model.rope_scaling_factor: no effect with model.rope_scaling = 'none'"):
        adopt_checkpoint_architecture(cfg, Config().to_dict(), extras["given"], "ckpt")


def test_defaults_without_config_are_megatron_lms():
    """megatron/training/arguments.py's defaults (and megatron-core's OptimizerConfig / TransformerConfig)."""
    cfg, _ = parse_args([])
    o, t = cfg.optimizer, cfg.training
    assert cfg.moe.num_experts == 0  # dense without --num-experts
    assert (o.min_lr, o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (
        0.0, 0.01, 0.9, 0.999, 1e-8, 1.0)
    assert (o.lr_decay_style, o.lr_warmup_iters, o.lr_warmup_init, o.lr_wsd_decay_style) == (
        "linear", 0, 0.0, "exponential")
    assert (cfg.model.init_std, cfg.model.rope_theta, cfg.model.norm_eps) == (0.02, 10000.0, 1e-5)
    assert (t.eval_interval, t.eval_iters, t.seed, cfg.logging.log_interval) == (1000, 100, 1234, 100)
    assert (cfg.moe.topk, cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff, cfg.moe.renormalize) == (2, 0.0, 0.0, True)
    assert cfg.data.split == "969,30,1" and cfg.checkpoint.keep_last == 0
    assert parse_args(["--lr", "1e-5"])[0].optimizer.lr == 1e-5  # min-lr 0 lets any lr stand alone


def test_examples_state_the_settings_they_rely_on():
    """The TOML examples carry this project's recommended settings, so changing a built-in default
    (Megatron-LM's) never changes what they train."""
    import tomllib
    from pathlib import Path

    stated = {"optimizer": {"lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
                            "lr_decay_style"},
              "moe": {"num_experts", "topk", "aux_loss_coeff"}, "checkpoint": {"keep_last"},
              "training": {"micro_batch_size", "global_batch_size", "eval_interval", "eval_iters"},
              "logging": {"log_interval"}}
    for path in sorted(Path(__file__).parents[1].joinpath("examples").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        for group, keys in stated.items():
            missing = keys - set(data.get(group, {}))
            assert not missing, f"{path.name} [{group}] relies on the defaults for {sorted(missing)}"


def test_megatron_meanings_of_moe_flags():
    moe = ["--num-experts", "8"]
    assert parse_args(moe)[0].moe.dropless is True  # no capacity factor: dropless, as Megatron-LM
    cfg, _ = parse_args(moe + ["--moe-expert-capacity-factor", "1.25"])
    assert cfg.moe.dropless is False and cfg.moe.capacity_factor == 1.25  # a capacity factor drops tokens
    assert parse_args(moe + ["--moe-router-pre-softmax"])[0].moe.renormalize is False
    assert parse_args(moe + ["--moe-input-jitter-eps", "0.01"])[0].moe.input_jitter_eps == 0.01
    with pytest.raises(ConfigError, match=r"global_aux_loss: Megatron-LM averages .* --moe.balance_scope global"):
        parse_args(moe + ["--moe-router-load-balancing-type", "global_aux_loss"])


@pytest.mark.parametrize("megatron, ours", [("GPTSentencePieceTokenizer", "sentencepiece"),
                                            ("Llama2Tokenizer", "sentencepiece"),
                                            ("HuggingFaceTokenizer", "huggingface")])
def test_tokenizer_types(megatron, ours):
    assert parse_args(["--tokenizer-type", megatron])[0].data.tokenizer_type == ours


def test_megatron_training_data_and_logging_flags():
    cfg, _ = parse_args(["--train-samples", "100", "--global-batch-size", "8", "--micro-batch-size", "2",
                         "--lr-warmup-fraction", ".01", "--lr-decay-samples", "90", "--valid-data-path", "v",
                         "--train-data-path", "1", "t1", "2", "t2", "--eod-mask-loss", "--data-cache-path", "c",
                         "--wandb-exp-name", "x", "--wandb-save-dir", "w", "--no-load-optim", "--no-load-rng",
                         "--finetune", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "cosine",
                         "--lr-wsd-decay-samples", "20", "--lr-warmup-init", "1e-6", "--exit-duration-in-mins", "5",
                         "--kv-channels", "64", "--log-params-norm", "--log-num-zeros-in-grad"])
    assert cfg.training.train_iters == 12 and cfg.training.run_samples == 100  # train_samples // global batch
    assert cfg.model.kv_channels == 64
    assert cfg.lr_schedule_samples() == (0.9, 90, 20)
    assert cfg.data.train_data_path == ["1", "t1", "2", "t2"] and cfg.data.eval_data_path == ["v"]
    assert cfg.data.eod_mask_loss and cfg.data.cache_dir == "c"
    assert (cfg.logging.run_name, cfg.logging.wandb_save_dir) == ("x", "w")
    c = cfg.checkpoint
    assert (c.load_optim, c.load_rng, c.finetune) == (False, False, True)
    assert cfg.logging.log_params_norm and cfg.logging.log_num_zeros_in_grad


@pytest.mark.parametrize("argv, needle", [
    (["--train-samples", "100", "--train-iters", "10"], "give one of training.train_iters"),
    (["--train-samples", "4", "--global-batch-size", "8"], "less than one global batch"),
    (["--train-samples", "100", "--lr-warmup-iters", "2"], "optimizer.lr_warmup_iters: this run is sample-based"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "one of optimizer.lr_warmup_fraction"),
    (["--data-path", "a", "--train-data-path", "b"], "exclude each other"),
    (["--train-data-path", "b"], "needs data.eval_data_path"),
    (["--tokenizer-type", "BertWordPieceCase"], "--tokenizer-type BertWordPieceCase: not available"),
    (["--lr-decay-style", "WSD"], "lr_wsd_decay_iters"),
    (["--decoupled-min-lr", "5e-5"], "optimizer.decoupled_min_lr (--decoupled-min-lr) has no effect without"),
    (["--decoupled-lr", "-5"], "optimizer.decoupled_lr = -5.0; must be >= 0"),
    (["--decoupled-lr", "1e-5", "--decoupled-min-lr", "5e-5"], "minimum learning rate 5e-05 exceeds"),
    (["--grad-reduce-in-bf16"], "no effect without training.bf16"),
    (["--kv-channels", "7"], "head dimension model.kv_channels = 7 must be even"),
    (["--hidden-size", "250", "--num-attention-heads", "4"], "set model.kv_channels (--kv-channels)"),
])
def test_megatron_training_flag_errors(argv, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_args(argv)


# Every flag of Megatron-LM's example scripts for this architecture (examples/mixtral/
# train_mixtral_8x7b_distributed.sh, examples/llama/train_llama3_8b_h100_fp8.sh) and of
# examples/gpt3/train_gpt3_175b_distributed.sh, torchrun's own flags left out.
MEGATRON_EXAMPLE_FLAGS = """
use-mcore-models disable-bias-linear seq-length max-position-embeddings num-layers hidden-size ffn-hidden-size
num-attention-heads init-method-std attention-dropout hidden-dropout normalization position-embedding-type swiglu
untie-embeddings-and-output-weights group-query-attention num-query-groups no-masked-softmax-fusion
no-position-embedding rotary-base num-experts moe-router-topk moe-router-load-balancing-type moe-aux-loss-coeff
moe-grouped-gemm moe-token-dispatcher-type overlap-param-gather overlap-grad-reduce tokenizer-type tokenizer-model
data-path split micro-batch-size global-batch-size lr train-iters lr-decay-iters lr-decay-style min-lr weight-decay
lr-warmup-iters clip-grad bf16 tensor-model-parallel-size pipeline-model-parallel-size expert-model-parallel-size
use-distributed-optimizer sequence-parallel log-interval save-interval eval-interval eval-iters save load
tensorboard-dir no-load-optim no-load-rng wandb-project wandb-exp-name
kv-channels rotary-percent attention-backend apply-layernorm-1p train-samples lr-decay-samples lr-warmup-samples
decoupled-lr decoupled-min-lr adam-beta1 adam-beta2 grad-reduce-in-bf16 cross-entropy-loss-fusion
calculate-per-token-loss manual-gc empty-unused-memory-level exit-duration-in-mins fp8-format fp8-amax-history-len
fp8-amax-compute-algo fp8-param-gather context-parallel-size mock-data vocab-size data-cache-path tiktoken-pattern
no-create-attention-mask-in-dataloader no-mmap-bin-files num-workers log-throughput profile profile-step-start
profile-step-end ckpt-format distributed-timeout-minutes
step-batch-size-schedule fp16 lr-warmup-fraction vocab-file merge-file
expert-tensor-parallel-size moe-layer-freq use-megatron-fsdp data-parallel-sharding-strategy init-model-with-meta-device
rope-type manual-gc-interval logging-level enable-experimental no-bias-gelu-fusion moe-flex-dispatcher-backend
trust-remote-code use-nccl-ub fsdp-double-buffer fsdp-manual-registration multi-latent-attention q-lora-rank
kv-lora-rank qk-head-dim qk-pos-emb-head-dim v-head-dim rotary-scaling-factor mscale mscale-all-dim mtp-num-layers
mtp-loss-scaling-factor qk-layernorm moe-shared-expert-intermediate-size moe-shared-expert-overlap
moe-router-score-function moe-router-topk-scaling-factor moe-router-enable-expert-bias moe-router-bias-update-rate
moe-router-num-groups moe-router-group-topk moe-router-force-load-balancing rotary-interleaved no-rope-freq
rotary-seq-len-interpolation-factor squared-relu window-size enable-gpt-oss quick-geglu glu-linear-offset
activation-func-clamp-value softmax-type window-attn-skip-freq megatron-fsdp-grad-comm-dtype
megatron-fsdp-main-grads-dtype megatron-fsdp-main-params-dtype
""".split()


def test_every_flag_of_megatrons_example_scripts_is_classified_and_in_the_readme():
    from pathlib import Path

    from megatron_moe import megatron_compat as mc
    from megatron_moe.config import IMPLIED_FLAGS, MEGATRON_FLAGS

    tables = (MEGATRON_FLAGS, IMPLIED_FLAGS, mc.STATES, mc.NO_EFFECT, mc.REFUSED, mc.VALUE_MAPS, mc.DERIVED,
              mc.YARN_FLAGS)
    unclassified = [f for f in MEGATRON_EXAMPLE_FLAGS if not any(f in table for table in tables)]
    assert not unclassified
    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    section = readme[readme.index("## Coming from Megatron-LM"):]
    missing = [f for f in MEGATRON_EXAMPLE_FLAGS if not re.search(f"`--{f}[` ]", section) and not f.startswith("fp8-")]
    assert not missing and "`--fp8-*`" in section


def test_command_line_overrides_a_files_moe_table_and_run_length(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[moe]\nnum_experts = 8\nrouter = "topk"\n[training]\ntrain_iters = 300\nglobal_batch_size = 8\n')
    assert parse_args(["--config", str(path), "--num-experts", "0"])[0].moe.num_experts == 0  # dense: file's moe moot
    assert parse_args(["--config", str(path), "--train-samples", "80"])[0].training.train_iters == 10
    path.write_text('[moe]\nnum_experts = 0\nrouter = "topk"\n')
    with pytest.raises(ConfigError, match="moe.router: no effect on a dense model"):
        parse_args(["--config", str(path)])


def test_a_full_dump_of_a_config_loads_back(tmp_path):
    """A TOML that states every setting (rope scaling's parameters at their defaults included) loads."""
    import json

    cfg = Config()
    cfg.moe.num_experts = 8
    path = tmp_path / "all.toml"
    path.write_text("".join(f"[{group}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                            for group, values in cfg.to_dict().items()))
    assert parse_args(["--config", str(path)])[0].to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="model.rope_scaling_factor: no effect with model.rope_scaling = 'none'"):
        parse_args(["--config", str(path), "--rope-scaling-factor", "16"])
