"""Layout validation (fails fast, before any process group) and the pipeline stage split."""

from __future__ import annotations

import pytest

from megatron_moe.config import ConfigError
from megatron_moe.parallel.engine import ParallelEngine
from megatron_moe.parallel.mesh import parallel_sizes
from megatron_moe.parallel.pipeline import build_stage_module, split_layers, stage_indices
from tests.builders import tiny_config


def test_tp3_with_4_heads_names_heads():
    match = r"tensor_model_parallel_size = 3 does not divide model.num_attention_heads = 4"
    with pytest.raises(ConfigError, match=match):
        parallel_sizes(tiny_config(tp=3, global_batch=6), world_size=3)


def test_three_ranks_with_tp2_names_world_size():
    with pytest.raises(
        ConfigError, match=r"world size 3 is not divisible by tensor_model_parallel_size \(2\)"
    ):
        parallel_sizes(tiny_config(tp=2), world_size=3)


def test_engine_validates_before_any_communication():
    # No process group exists: the engine must raise on the layout, not fail on a collective.
    with pytest.raises(ConfigError, match="world size 1 is not divisible"):
        ParallelEngine(tiny_config(tp=2))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: setattr(c.model, "num_query_groups", 1), "num_query_groups"),
        (lambda c: setattr(c.model, "ffn_hidden_size", 63), "ffn_hidden_size = 63"),
        (lambda c: setattr(c.moe, "expert_ffn_hidden_size", 33), "expert_ffn_hidden_size = 33"),
        (lambda c: setattr(c.model, "vocab_size", 127), "vocab_size"),
        (lambda c: setattr(c.training, "global_batch_size", 6), "global_batch_size = 6"),
    ],
)
def test_sizes_that_do_not_fit_tp2(change, match):
    cfg = tiny_config(tp=2)
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        parallel_sizes(cfg, world_size=4)


def test_more_stages_than_layers():
    with pytest.raises(ConfigError, match=r"= 8 pipeline stages exceed model.num_layers = 4"):
        parallel_sizes(tiny_config(pp=4, virtual_pipeline_stages=2), world_size=4)


def test_valid_layout_sizes():
    s = parallel_sizes(tiny_config(tp=2, pp=2), world_size=8)
    assert (s.pp, s.dp, s.tp, s.num_microbatches) == (2, 2, 2, 2)


def test_virtual_stages_need_interleaved_schedule():
    with pytest.raises(ConfigError, match="interleaved_1f1b"):
        tiny_config(pp=2, virtual_pipeline_stages=2).validate()
    with pytest.raises(ConfigError, match="needs pipeline_model_parallel_size > 1"):
        tiny_config(pipeline_schedule="interleaved_1f1b", virtual_pipeline_stages=2).validate()
    tiny_config(pp=2, pipeline_schedule="interleaved_1f1b", virtual_pipeline_stages=2).validate()


def test_split_layers_even_and_first_last_fewer():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert [len(s) for s in split_layers(8, 4, first_last_fewer=True)] == [1, 3, 3, 1]
    assert [len(s) for s in split_layers(3, 3, first_last_fewer=True)] == [1, 1, 1]  # falls back to even
    assert stage_indices(1, 2, 2) == [1, 3]
    with pytest.raises(ConfigError):
        split_layers(2, 3)


def test_stage_modules_cover_the_model_once():
    from megatron_moe.model.transformer import build_model

    model = build_model(tiny_config())
    split = split_layers(4, 4)
    stages = [build_stage_module(model, ids, i == 0, i == 3) for i, ids in enumerate(split)]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert stages[0].tok_embeddings is not None and stages[0].output is None
    assert stages[3].tok_embeddings is None and stages[3].output is not None
