from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_moe.data.datasets import (
    MicroBatchIterator,
    build_gpt_datasets,
    parse_data_path,
    parse_split,
    validate_indexed_dataset,
)
from megatron_moe.testing import run_distributed

SEQ = 16


def _build(corpus_dir, cache, data_path=None, seed=7, num_samples=(200, 20), split="90,10,0"):
    data_path = data_path or [corpus_dir["prefix_a"]]
    return build_gpt_datasets(
        data_path, split, corpus_dir["tokenizer"], SEQ, seed, num_samples, blend_cache_dir=str(cache)
    )


def _all_tokens(ds, n):
    return torch.stack([ds[i]["tokens"] for i in range(n)])


def test_items_and_determinism(tmp_path, corpus_dir):
    train, valid = _build(corpus_dir, tmp_path / "c1")
    assert len(train) >= 200 and len(valid) >= 20
    item = train[0]
    assert item["tokens"].shape == (SEQ,) and item["tokens"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32
    assert "attention_mask" not in item
    for i in range(20):
        it = train[i]
        assert torch.equal(it["labels"][:-1], it["tokens"][1:])
        assert torch.all(it["loss_mask"] == 1.0)
    # The samples are windows of the token stream: every eod comes from the data.
    assert int((_all_tokens(train, 200) == corpus_dir["tokenizer"].eod).sum()) > 0

    again, _ = _build(corpus_dir, tmp_path / "c2")  # fresh cache: rebuilt from scratch
    cached, _ = _build(corpus_dir, tmp_path / "c1")  # cache hit
    other, _ = _build(corpus_dir, tmp_path / "c3", seed=8)
    ref = _all_tokens(train, 200)
    assert torch.equal(_all_tokens(again, 200), ref)
    assert torch.equal(_all_tokens(cached, 200), ref)
    assert not torch.equal(_all_tokens(other, 200), ref)
    assert len(os.listdir(tmp_path / "c1")) > 0


def test_train_and_valid_use_disjoint_documents(tmp_path, corpus_dir):
    tok = corpus_dir["tokenizer"]
    # num_samples=1 builds exactly one epoch of each split's documents.
    train, valid = _build(corpus_dir, tmp_path / "c", num_samples=(1, 1), split="50,50,0")
    docs = corpus_dir["docs_a"]
    half = len(docs) // 2

    def doc_tokens(part):
        return Counter(t for d in part for t in tok.encode(d) + [tok.eod])

    def sample_tokens(ds):
        return Counter(t for i in range(len(ds)) for t in ds[i]["tokens"].tolist())

    for ds, own in ((train, docs[:half]), (valid, docs[half:])):
        expected, got = doc_tokens(own), sample_tokens(ds)
        # The samples cover the split's token stream except its last partial window.
        assert not got - expected
        assert expected.total() - got.total() <= SEQ
    assert sample_tokens(valid) - doc_tokens(docs[:half])  # would be empty if valid held train docs


def _stream(ds, start, mbs, dp, rank, steps):
    it = MicroBatchIterator(ds, mbs, consumed_samples=start, dp_rank=rank, dp_size=dp)
    return [next(it) for _ in range(steps)], it


def test_micro_batch_iterator_dp_slicing(tmp_path, corpus_dir):
    train, _ = _build(corpus_dir, tmp_path / "c")
    mbs, dp, steps = 2, 3, 5
    global_batches, it1 = _stream(train, 0, mbs * dp, 1, 0, steps)
    assert it1.consumed_samples == steps * mbs * dp
    for rank in range(dp):
        batches, it = _stream(train, 0, mbs, dp, rank, steps)
        assert it.consumed_samples == steps * mbs * dp
        for k, (b, g) in enumerate(zip(batches, global_batches, strict=True)):
            assert b["tokens"].shape == (mbs, SEQ)
            assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
            assert b["loss_mask"].dtype == torch.float32
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(b[key], g[key][rank * mbs : (rank + 1) * mbs])
            expected = torch.stack([train[k * mbs * dp + rank * mbs + j]["tokens"] for j in range(mbs)])
            assert torch.equal(b["tokens"], expected)
    # Ranks see different samples.
    r0, _ = _stream(train, 0, mbs, dp, 0, 1)
    r1, _ = _stream(train, 0, mbs, dp, 1, 1)
    assert not torch.equal(r0[0]["tokens"], r1[0]["tokens"])


def test_micro_batch_iterator_resume_and_exhaustion(tmp_path, corpus_dir):
    train, _ = _build(corpus_dir, tmp_path / "c")
    full, _ = _stream(train, 0, 4, 2, 1, 6)
    first, it = _stream(train, 0, 4, 2, 1, 3)
    resumed, _ = _stream(train, it.consumed_samples, 4, 2, 1, 3)
    for a, b in zip(full, first + resumed, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["labels"], b["labels"])

    n = len(train)
    tail = MicroBatchIterator(train, 4, consumed_samples=n - 9, dp_rank=0, dp_size=2)
    assert len(tail) == 1
    next(tail)
    with pytest.raises(StopIteration, match="exhausted"):
        next(tail)
    assert list(MicroBatchIterator(train, 4, consumed_samples=n - 7, dp_size=2)) == []
    with pytest.raises(ValueError, match="consumed_samples"):
        MicroBatchIterator(train, 4, consumed_samples=n + 1)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchIterator(train, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        MicroBatchIterator(train, 0)


def test_blending_with_weights(tmp_path, corpus_dir):
    tok = corpus_dir["tokenizer"]
    a, b = corpus_dir["prefix_a"], corpus_dir["prefix_b"]
    train, valid = _build(corpus_dir, tmp_path / "c", data_path=["0.25", a, "0.75", b], num_samples=(400, 40))
    assert len(train) >= 400 and len(valid) >= 40
    ids = np.array([int(train[i]["dataset_id"]) for i in range(400)])
    frac_b = float((ids == 1).mean())
    assert abs(frac_b - 0.75) < 0.02
    # Samples from prefix A decode to A's vocabulary, from B to B's.
    words_a = {"alpha", "beta", "gamma", "delta", "router", "expert", "token", "layer"}
    words_b = {"zeta", "kappa", "omega", "sigma", "mixture", "gate", "shard", "batch"}
    for i in range(40):
        words = set(tok.decode(train[i]["tokens"]).replace(",", " ").replace(".", " ").split())
        own, other = (words_a, words_b) if ids[i] == 0 else (words_b, words_a)
        assert words & own and not words & other
    again, _ = _build(corpus_dir, tmp_path / "c2", data_path=["0.25", a, "0.75", b], num_samples=(400, 40))
    assert torch.equal(_all_tokens(train, 100), _all_tokens(again, 100))
    # Without weights: blend by size (both corpora hold similar token counts).
    unweighted, _ = _build(corpus_dir, tmp_path / "c3", data_path=[a, b], num_samples=(100, 10))
    ids = np.array([int(unweighted[i]["dataset_id"]) for i in range(100)])
    assert 0.3 < float((ids == 1).mean()) < 0.7


def test_missing_prefix(tmp_path, corpus_dir):
    src = corpus_dir["prefix_a"]
    prefix = str(tmp_path / "copy")
    shutil.copy(src + ".bin", prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"copy'.*index \(\.idx\).*copy\.idx"):
        _build(corpus_dir, tmp_path / "c", data_path=[prefix])
    shutil.copy(src + ".idx", prefix + ".idx")
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"data \(\.bin\).*copy\.bin"):
        _build(corpus_dir, tmp_path / "c", data_path=[prefix])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _build(corpus_dir, tmp_path / "c", data_path=["1", src, "1", str(tmp_path / "nowhere")])


def test_corrupt_index(tmp_path, corpus_dir):
    src = corpus_dir["prefix_a"]
    prefix = str(tmp_path / "bad")
    shutil.copy(src + ".bin", prefix + ".bin")
    raw = open(src + ".idx", "rb").read()
    assert validate_indexed_dataset(src).num_documents == len(corpus_dir["docs_a"])

    for name, data in [
        ("truncated", raw[: len(raw) - 100]),
        ("short header", raw[:20]),
        ("bad magic", b"XXXXXXXXX" + raw[9:]),
    ]:
        with open(prefix + ".idx", "wb") as f:
            f.write(data)
        with pytest.raises(ValueError, match=r"bad\.idx"):
            _build(corpus_dir, tmp_path / "c", data_path=[prefix])
        assert name

    with open(prefix + ".idx", "wb") as f:
        f.write(raw)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(src + ".bin") // 2)
    with pytest.raises(ValueError, match=r"bad\.bin is truncated"):
        _build(corpus_dir, tmp_path / "c", data_path=[prefix])


def test_argument_validation(tmp_path, corpus_dir):
    assert parse_data_path(["p"]) == (["p"], None)
    assert parse_data_path(["p1", "p2"]) == (["p1", "p2"], None)
    assert parse_data_path(["0.3", "p1", "0.7", "p2.bin"]) == (["p1", "p2"], [0.3, 0.7])
    with pytest.raises(ValueError):
        parse_data_path(["0.3", "p1", "p2", "p3"])
    with pytest.raises(ValueError):
        parse_data_path(["0", "p1"])
    with pytest.raises(ValueError):
        parse_data_path([])
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("", "1,-1", "0,0,0", "1e-3,1", "1,2,3,4"):
        with pytest.raises(ValueError):
            parse_split(bad)
    with pytest.raises(ValueError, match="valid"):
        _build(corpus_dir, tmp_path / "c", split="100,0,0", num_samples=(10, 5))
    train, valid = _build(corpus_dir, tmp_path / "c", split="100,0,0", num_samples=(10, 0))
    assert valid is None and len(train) >= 10
    with pytest.raises(ValueError, match="no document"):
        _build(corpus_dir, tmp_path / "c", split="999,1,0", num_samples=(10, 1))
    with pytest.raises(ValueError, match="seq_length"):
        build_gpt_datasets([corpus_dir["prefix_a"]], "9,1", corpus_dir["tokenizer"], 0, 1, (1, 1))


def _distributed_build(rank, world_size, prefix_a, prefix_b, model, cache):
    from megatron_moe.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(model)
    train, valid = build_gpt_datasets(["1", prefix_a, "2", prefix_b], "90,10,0", tok, SEQ, 3, (64, 8), cache)
    it = MicroBatchIterator(train, 2, dp_rank=rank, dp_size=world_size)
    return [next(it)["tokens"] for _ in range(3)], len(train), len(valid)


@pytest.mark.slow
def test_distributed_build_matches_single_process(tmp_path, corpus_dir):
    args = (corpus_dir["prefix_a"], corpus_dir["prefix_b"], corpus_dir["model"], str(tmp_path / "dist"))
    results = run_distributed(_distributed_build, world_size=2, args=args)
    train, valid = build_gpt_datasets(
        ["1", args[0], "2", args[1]], "90,10,0", corpus_dir["tokenizer"], SEQ, 3, (64, 8), str(tmp_path / "single")
    )
    single, _ = _stream(train, 0, 4, 1, 0, 3)
    for rank, (batches, n_train, n_valid) in enumerate(results):
        assert (n_train, n_valid) == (len(train), len(valid))
        for b, g in zip(batches, single, strict=True):
            assert torch.equal(b, g["tokens"][rank * 2 : (rank + 1) * 2])
    assert any(p.name.endswith("BlendedDataset-train-dataset_index.npy") for p in (tmp_path / "dist").rglob("*"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran_from_index_cache",))


def test_a_pickle_in_the_index_cache_is_refused_before_megatron_core_loads_it(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    _build(corpus_dir, cache)  # megatron-core writes its (numeric) indices
    legit = sorted(cache.rglob("*.npy"))
    assert legit
    # The report's file: a bare pickle named .npy; numpy.load(allow_pickle=True) unpickles it even
    # when asked to memory-map (shown here on a copy, in this process).
    import pickle

    (tmp_path / "probe.npy").write_bytes(pickle.dumps(_RunsCode()))
    np.load(tmp_path / "probe.npy", allow_pickle=True, mmap_mode="r")
    assert (tmp_path / "ran_from_index_cache").exists()
    (tmp_path / "ran_from_index_cache").unlink()
    legit[0].write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match=rf"{legit[0].name} is not a valid .npy"):
        _build(corpus_dir, cache)
    assert not (tmp_path / "ran_from_index_cache").exists()
    np.save(legit[0], np.array([_RunsCode()], dtype=object), allow_pickle=True)  # an object array
    with pytest.raises(ValueError, match=rf"{legit[0].name} holds Python objects"):
        _build(corpus_dir, cache)
    assert not (tmp_path / "ran_from_index_cache").exists()


def test_data_files_must_belong_together_and_to_the_tokenizer(tmp_path, corpus_dir):
    """An .idx with another .bin, ids from another tokenizer, replaced files under an old cache."""
    import json

    root = tmp_path / "d"
    shutil.copytree(os.path.dirname(corpus_dir["prefix_a"]), root, ignore=shutil.ignore_patterns("index-cache"))
    a = str(root / os.path.basename(corpus_dir["prefix_a"]))
    b = str(root / os.path.basename(corpus_dir["prefix_b"]))
    assert os.path.isfile(a + ".tokenizer.json")  # written by preprocessing
    _build(corpus_dir, tmp_path / "c", data_path=[a])
    first = sorted(p.parent.name for p in (tmp_path / "c").rglob("*.npy"))
    # The same path, other content: a new cache key (stale indices are never reused).
    shutil.copy(b + ".bin", a + ".bin")
    shutil.copy(b + ".idx", a + ".idx")
    _build(corpus_dir, tmp_path / "c", data_path=[a])
    assert set(p.parent.name for p in (tmp_path / "c").rglob("*.npy")) - set(first)
    # An index paired with another (here larger, then smaller) data file.
    shutil.copy(corpus_dir["prefix_a"] + ".bin", a + ".bin")
    with pytest.raises(ValueError, match="the .idx belongs to another .bin"):
        _build(corpus_dir, tmp_path / "c", data_path=[a])
    shutil.copy(corpus_dir["prefix_a"] + ".idx", a + ".idx")
    shutil.copy(b + ".bin", a + ".bin")
    with pytest.raises(ValueError, match="is truncated"):
        _build(corpus_dir, tmp_path / "c", data_path=[a])
    # Ids written by another tokenizer.
    record = json.loads(open(b + ".tokenizer.json").read())
    record["model_sha256"] = "0" * 64
    open(b + ".tokenizer.json", "w").write(json.dumps(record))
    with pytest.raises(ValueError, match="was tokenized with"):
        _build(corpus_dir, tmp_path / "c", data_path=[b])

