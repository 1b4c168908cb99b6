"""Layout validation (fails fast, before any process group) and the pipeline stage split."""

from __future__ import annotations

import re

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


def test_split_layers_even():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_indices(1, 2, 2) == [1, 3]
    with pytest.raises(ConfigError):
        split_layers(2, 3)


@pytest.mark.parametrize("layers,pp,vp,first,last,embedding,loss", [
    (46, 4, 1, 10, 12, 0, 0), (46, 4, 1, 0, 10, 0, 0), (46, 4, 1, 10, 0, 0, 0), (9, 2, 1, 4, 0, 0, 0),
    (24, 2, 2, 10, 0, 0, 0), (30, 4, 2, 6, 8, 0, 0), (32, 4, 2, 0, 8, 0, 0), (7, 2, 1, 3, 4, 0, 0),
    (46, 4, 1, 0, 0, 1, 1), (47, 4, 1, 0, 0, 1, 0), (47, 4, 1, 0, 0, 0, 1), (30, 2, 2, 0, 0, 1, 1)])
def test_pipeline_split_places_layers_as_megatron_core(layers, pp, vp, first, last, embedding, loss):
    """--decoder-first/last-pipeline-num-layers and --account-for-embedding/loss-in-pipeline-split: every stage
    starts at the layer megatron-core's get_transformer_layer_offset gives its (pipeline rank, virtual stage), the
    stages cover the layers in order."""
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_moe.parallel.pipeline import pipeline_layers

    cfg = tiny_config(num_layers=layers, pp=pp, pipeline_first_stage_layers=first, pipeline_last_stage_layers=last,
                      virtual_pipeline_stages=vp, pipeline_schedule="interleaved_1f1b" if vp > 1 else "1f1b",
                      account_for_embedding_in_pipeline_split=bool(embedding),
                      account_for_loss_in_pipeline_split=bool(loss))
    cfg.parallel.validate()
    stages = pipeline_layers(cfg)
    assert [i for stage in stages for i in stage] == list(range(layers)) and all(stages)
    theirs = SimpleNamespace(pipeline_model_parallel_size=pp, pipeline_model_parallel_layout=None, num_layers=layers,
                             num_layers_in_first_pipeline_stage=first or None,
                             num_layers_in_last_pipeline_stage=last or None,
                             virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                             account_for_embedding_in_pipeline_split=bool(embedding),
                             account_for_loss_in_pipeline_split=bool(loss))
    for index, stage in enumerate(stages):
        rank, virtual = index % pp, index // pp
        assert stage[0] == get_transformer_layer_offset(theirs, virtual if vp > 1 else None, rank), index


@pytest.mark.parametrize("settings,needle", [
    ({"num_layers": 46, "pp": 4, "pipeline_first_stage_layers": 11, "pipeline_last_stage_layers": 12},
     "the 23 other layers must split evenly over the 2 other pipeline ranks"),
    ({"num_layers": 8, "pp": 2, "pipeline_first_stage_layers": 3, "pipeline_last_stage_layers": 3},
     "the 2 other layers must split evenly over the 0 other pipeline ranks"),
    ({"num_layers": 8, "pp": 2, "pipeline_first_stage_layers": 3, "virtual_pipeline_stages": 2,
      "pipeline_schedule": "interleaved_1f1b"}, "layers [3, 5] must split evenly over its 2 virtual stages"),
    ({"num_layers": 5, "pp": 2, "pipeline_first_stage_layers": 3, "pipeline_last_stage_layers": 3},
     "the first and last stage's 6 layers exceed the model's 5"),
    ({"num_layers": 8, "pipeline_first_stage_layers": 3}, "need pipeline_model_parallel_size > 1"),
    ({"num_layers": 8, "pp": 2, "pipeline_first_stage_layers": 3, "account_for_loss_in_pipeline_split": True},
     "give the layer counts of the first and last stage, or let the embedding and loss count as layers, not both"),
    ({"num_layers": 8, "pp": 2, "account_for_loss_in_pipeline_split": True},
     "9 layers must split evenly over the 2 stages"),
])
def test_uneven_pipeline_counts_that_do_not_fit_are_named(settings, needle):
    """Checked before any process group exists, naming the settings (megatron-core's rules)."""
    from megatron_moe.parallel.mesh import parallel_sizes

    cfg = tiny_config(**settings)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        cfg.parallel.validate()
        parallel_sizes(cfg, cfg.parallel.pipeline_model_parallel_size)


@pytest.mark.parametrize("layout,pp,layers,mtp", [
    ("Et|(tt|)*30mL", 4, 61, 1), ("Ettt|(tt|)*29,m|L", 1, 61, 0), ("E|t*4mmL", 2, 4, 2), ("Et*3|t*2|tmL", 3, 6, 1),
    ("Et|t|t|tmL", 2, 4, 1), ("Et*7|(t*8|)*2t*8L", 4, 31, 0)])
def test_pipeline_layout_reads_as_megatron_core(layout, pp, layers, mtp):
    """--pipeline-model-parallel-layout: the stages' symbols as megatron-core's PipelineParallelLayerLayout parses
    them, and each stage's decoder layers (its 't's, in order; a stage may have none) as its layout counts them."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    from megatron_moe.config import parse_pipeline_layout
    from megatron_moe.parallel.pipeline import pipeline_layers

    symbols = {LayerType.embedding: "E", LayerType.decoder: "t", LayerType.mtp: "m", LayerType.loss: "L"}
    theirs = PipelineParallelLayerLayout.parse_str_to_list(layout)
    assert parse_pipeline_layout(layout) == ["".join(symbols[x] for x in stage) for stage in theirs]
    if pp == 1:  # a layout megatron-core reads with MTP in a stage of its own: refused here
        return
    v = len(theirs) // pp
    cfg = tiny_config(num_layers=layers, pp=pp, mtp_num_layers=mtp, pipeline_layout=layout, virtual_pipeline_stages=v,
                      pipeline_schedule="interleaved_1f1b" if v > 1 else "1f1b")
    grid = PipelineParallelLayerLayout(layout, pp)
    grid.validate_layer_layout(layers, mtp or None)
    stages = pipeline_layers(cfg)
    assert [i for stage in stages for i in stage] == list(range(layers))
    assert [len(stage) for stage in stages] == [grid.layout[s % pp][s // pp].count(LayerType.decoder)
                                                for s in range(len(stages))]


@pytest.mark.parametrize("layout,settings,needle", [
    ("Ettt|tmL", {"mtp_num_layers": 1, "num_layers": 3}, "4 decoder layers (t) and 1 multi-token prediction"),
    ("tEt|ttL", {}, "the embedding (E) must open the first stage"),
    ("Ettm|ttL", {"mtp_num_layers": 1}, "run in the last stage after its decoder layers"),
    ("Ett|tmtL", {"mtp_num_layers": 1}, "run in the last stage after its decoder layers"),
    ("Ett||t|tL", {"virtual_pipeline_stages": 2}, "stage 1 holds nothing"),
    ("Ett|ttX", {}, "unknown symbols ['X']"),
    ("Ett|tt|L", {}, "3 stages; pipeline_model_parallel_size x virtual stages = 2"),
    ("Ett|ttL", {"pipeline_last_stage_layers": 2}, "places every layer itself"),
])
def test_pipeline_layouts_this_model_cannot_run_are_named(layout, settings, needle):
    from megatron_moe.parallel.mesh import parallel_sizes

    settings = {"pp": 2, "pipeline_layout": layout, **settings}
    if settings.get("virtual_pipeline_stages", 1) > 1:
        settings["pipeline_schedule"] = "interleaved_1f1b"
    cfg = tiny_config(**settings)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        cfg.parallel.validate()
        parallel_sizes(cfg, 2)


def test_megatron_uneven_pipeline_flags():
    from megatron_moe.config import parse_args

    cfg, _ = parse_args(["--num-layers", "46", "--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-"
                         "layers", "10", "--decoder-last-pipeline-num-layers", "12"])
    assert (cfg.parallel.pipeline_first_stage_layers, cfg.parallel.pipeline_last_stage_layers) == (10, 12)
    cfg, _ = parse_args(["--num-layers", "46", "--pipeline-model-parallel-size", "4",
                         "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"])
    assert cfg.parallel.account_for_embedding_in_pipeline_split and cfg.parallel.account_for_loss_in_pipeline_split
    # a layout of 4 stages on 2 pipeline ranks: 2 virtual stages each, interleaved, as megatron-core takes it
    cfg, _ = parse_args(["--num-layers", "5", "--pipeline-model-parallel-size", "2", "--mtp-num-layers", "1",
                         "--global-batch-size", "8", "--pipeline-model-parallel-layout", "Et|(tt|)*2mL"])
    assert (cfg.parallel.virtual_pipeline_stages, cfg.parallel.pipeline_schedule) == (2, "interleaved_1f1b")


def test_stage_modules_cover_the_model_once():
    from megatron_moe.model.transformer import build_model

    model = build_model(tiny_config())
    split = split_layers(4, 4)
    stages = [build_stage_module(model, ids, i == 0, i == 3) for i, ids in enumerate(split)]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert stages[0].tok_embeddings is not None and stages[0].output is None
    assert stages[3].tok_embeddings is None and stages[3].output is not None
