"""GPT pretraining datasets (megatron-core's GPTDataset and blending) and a micro-batch iterator.

:func:`build_gpt_datasets` builds the train and validation datasets from Megatron-style
``--data-path`` and ``--split`` values with megatron-core's ``BlendedMegatronDatasetBuilder``.
It works with or without ``torch.distributed`` initialised. When it is initialised, every rank
must call it (it holds barriers): rank 0 builds the sample indices and writes them to the cache
folder, the other ranks then read them, so the cache folder must be visible to all ranks (a
shared file system across nodes).

:class:`MicroBatchIterator` walks a dataset in the order of Megatron-LM's
``MegatronPretrainingSampler`` and collates micro-batches.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import struct
import warnings
from dataclasses import dataclass

import torch

from megatron_moe.config import parse_split
from megatron_moe.data.errors import DataError
from megatron_moe.data.preprocess import TOKENIZER_RECORD

with warnings.catch_warnings():
    # Importing megatron.core warns that the GPU-only Transformer Engine / apex are absent.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_PREAMBLE_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core DType code -> bytes


class _DropUncachedBlendWarning(logging.Filter):
    """Hide megatron-core's warning that blend indices are not cached: it is intended here (see
    ``build_gpt_datasets``; blend indices are cheap to rebuild)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "indexes because path_to_cache is None" not in record.getMessage()


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_DropUncachedBlendWarning())


@dataclass(frozen=True)
class IndexedDataInfo:
    """Header facts of one validated ``.bin/.idx`` pair.

    Attributes:
        prefix: the dataset prefix.
        num_sequences: stored sequences (one per document for data from this package).
        num_documents: documents.
        num_tokens: tokens in the ``.bin`` file.
        dtype_size: bytes per token id.
    """

    prefix: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    dtype_size: int


def validate_indexed_dataset(prefix: str) -> IndexedDataInfo:
    """Check that ``prefix.bin`` and ``prefix.idx`` exist and are consistent, reading O(1) bytes.

    Raises:
        FileNotFoundError: a file is missing; the message names the prefix and the file.
        ValueError: the ``.idx`` is truncated or corrupt, or the ``.bin`` is shorter than the index
            says; the message names the file.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path, what in ((idx_path, "index (.idx)"), (bin_path, "data (.bin)")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset prefix {prefix!r}: {what} file not found: {path}")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        preamble = f.read(_INDEX_PREAMBLE_BYTES)
        if len(preamble) < _INDEX_PREAMBLE_BYTES:
            raise DataError(f"corrupt index file {idx_path}: truncated header ({idx_size} bytes)")
        if preamble[:9] != _INDEX_HEADER:
            raise DataError(f"corrupt index file {idx_path}: bad magic header {preamble[:9]!r}")
        (version,) = struct.unpack("<Q", preamble[9:17])
        if version != 1:
            raise DataError(f"corrupt index file {idx_path}: unsupported version {version}")
        code = preamble[17]
        if code not in _DTYPE_SIZES:
            raise DataError(f"corrupt index file {idx_path}: unknown dtype code {code}")
        dtype_size = _DTYPE_SIZES[code]
        num_sequences, num_doc_indices = struct.unpack("<QQ", preamble[18:34])
        expected = _INDEX_PREAMBLE_BYTES + num_sequences * (4 + 8) + num_doc_indices * 8
        if idx_size not in (expected, expected + num_sequences):
            raise DataError(
                f"corrupt or truncated index file {idx_path}: {idx_size} bytes, expected {expected} "
                f"for {num_sequences} sequences and {num_doc_indices} document indices"
            )
        if num_doc_indices < 2 or num_sequences < 1:
            raise DataError(f"index file {idx_path} describes an empty dataset")
        # Last document index must equal the sequence count.
        f.seek(_INDEX_PREAMBLE_BYTES + num_sequences * 12 + (num_doc_indices - 1) * 8)
        (last_doc_index,) = struct.unpack("<q", f.read(8))
        if last_doc_index != num_sequences:
            raise DataError(
                f"corrupt index file {idx_path}: last document index {last_doc_index} != sequence count {num_sequences}"
            )
        f.seek(_INDEX_PREAMBLE_BYTES + (num_sequences - 1) * 4)
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_INDEX_PREAMBLE_BYTES + num_sequences * 4 + (num_sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", f.read(8))
    if last_length < 0 or last_pointer < 0:
        raise DataError(f"corrupt index file {idx_path}: negative sequence length or pointer")
    bin_end = last_pointer + last_length * dtype_size
    bin_size = os.path.getsize(bin_path)
    if bin_size < bin_end:
        raise DataError(f"data file {bin_path} is truncated: {bin_size} bytes, its index {idx_path} needs {bin_end}")
    if bin_size > bin_end:
        raise DataError(f"data file {bin_path} has {bin_size} bytes but its index {idx_path} describes {bin_end}: "
                        "the .idx belongs to another .bin (rebuild them together)")
    return IndexedDataInfo(
        prefix=prefix,
        num_sequences=int(num_sequences),
        num_documents=int(num_doc_indices - 1),
        num_tokens=int(bin_end // dtype_size),
        dtype_size=dtype_size,
    )


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Split a Megatron ``--data-path`` list into (prefixes, weights or None).

    Accepts ``["prefix"]``, ``["p1", "p2", ...]`` (weights from dataset sizes) or
    ``["w1", "p1", "w2", "p2", ...]``. A prefix given with a ``.bin``/``.idx`` suffix has it removed.

    Raises:
        ValueError: empty list, mixed weighted/unweighted entries, or non-positive weights.
    """
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = [str(x).strip() for x in data_path if str(x).strip()]
    if not items:
        raise DataError("data_path is empty")

    def _as_float(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    weights: list[float] | None = None
    prefixes = items
    if len(items) % 2 == 0:
        maybe = [_as_float(x) for x in items[0::2]]
        if all(w is not None for w in maybe):
            weights = [float(w) for w in maybe]  # type: ignore[arg-type]
            prefixes = items[1::2]
        elif any(w is not None for w in maybe):
            raise DataError(f"data_path mixes weights and prefixes inconsistently: {items}")
    if weights is None and any(_as_float(x) is not None for x in items):
        raise DataError(f"data_path has a number where a prefix was expected (weights need pairs): {items}")
    if weights is not None:
        for w in weights:
            if not math.isfinite(w) or w <= 0:
                raise DataError(f"data_path weights must be positive and finite, got {weights}")
    prefixes = [p[: -len(".bin")] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    return prefixes, weights


def _split_document_range(bookends: tuple[float, float] | None, num_docs: int) -> int:
    # Same rounding as megatron-core's BlendedMegatronDatasetBuilder.
    if bookends is None:
        return 0
    beg = int(round(bookends[0] * float(num_docs)))
    end = int(round(bookends[1] * float(num_docs)))
    return max(end - beg, 0)


@dataclass
class _GPTConfig(GPTDatasetConfig):
    """GPTDatasetConfig with a cache folder for the GPTDataset indices alone."""

    gpt_index_cache_dir: str | None = None


class _GPTDataset(GPTDataset):
    """GPTDataset that caches its indices in ``config.gpt_index_cache_dir`` when ``path_to_cache`` is None.

    megatron-core reads one ``path_to_cache`` for GPTDataset and BlendedDataset; this lets the
    GPTDataset indices be cached while the (cheap) blend indices are built in memory.
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        if config.path_to_cache is None and getattr(config, "gpt_index_cache_dir", None):
            config = copy.copy(config)
            config.path_to_cache = config.gpt_index_cache_dir
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)


def _data_fingerprint(prefixes: list[str]) -> str:
    """A short hash of the data files' absolute paths, sizes and modification times."""
    import hashlib

    h = hashlib.sha256()
    for prefix in prefixes:
        for path in (prefix + ".bin", prefix + ".idx"):
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return "data-" + h.hexdigest()[:16]


def check_tokenizer_record(prefix: str, tokenizer) -> None:
    """If preprocessing recorded its tokenizer beside ``prefix`` (this project's preprocessing does;
    Megatron-LM's does not), the run's tokenizer must be that one; raises DataError otherwise."""
    import json

    path = prefix + TOKENIZER_RECORD
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer record {path} is unreadable ({e}); delete it or re-run preprocessing") from None
    mine = getattr(tokenizer, "unique_identifiers", {}).get("model_sha256")
    if mine is not None and record.get("model_sha256") != mine:
        raise DataError(f"{prefix}.bin was tokenized with {record.get('model', 'another tokenizer')!r} (vocabulary "
                        f"{record.get('vocab_size')}, sha256 {str(record.get('model_sha256'))[:12]}...), not with "
                        f"this run's tokenizer (vocabulary {tokenizer.vocab_size}, sha256 {mine[:12]}...)")


def check_index_cache(cache_dir: str) -> None:
    """Refuse index-cache files that could run code when megatron-core opens them.

    megatron-core loads its cached sample indices with ``numpy.load(..., allow_pickle=True)``: an
    ``.npy`` holding Python objects is a pickle and would run when loaded. Every ``.npy`` under
    ``cache_dir`` must hold a plain numeric array (its header is read, never its data); raises
    ValueError naming the first file that does not.
    """
    import numpy as np

    for root, _, files in os.walk(cache_dir):
        for name in sorted(files):
            if not name.endswith(".npy"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        dtype = np.lib.format.read_array_header_1_0(f)[2]
                    else:
                        dtype = np.lib.format.read_array_header_2_0(f)[2]
            except (OSError, ValueError) as e:
                raise DataError(f"dataset index cache file {path} is not a valid .npy file ({e}); delete it "
                                 "and megatron-core rebuilds it") from None
            if dtype.hasobject:
                raise DataError(f"dataset index cache file {path} holds Python objects (a pickle), which loading "
                                 "would execute; refusing it. Delete it: megatron-core rebuilds the indices")


def build_gpt_datasets(
    data_path: list[str],
    split: str,
    tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int],
    blend_cache_dir: str | None = None,
    eod_mask_loss: bool = False,
):
    """Build the train and validation GPT datasets with megatron-core.

    Args:
        data_path: Megatron ``--data-path``: ``["prefix"]``, ``["p1", "p2"]`` or
            ``["w1", "p1", "w2", "p2", ...]`` (prefixes of ``.bin/.idx`` pairs).
        split: Megatron ``--split`` such as ``"969,30,1"`` (train, valid, test document fractions
            of every prefix; the test part is left unused).
        tokenizer: an object with ``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers``
            (e.g. :class:`megatron_moe.data.tokenizer.SentencePieceTokenizer`).
        seq_length: tokens per sample; each item holds ``tokens``/``labels`` of this length.
        seed: seed of the document and sample shuffles.
        num_samples: (train samples, validation samples) to provide at least; the datasets
            repeat epochs of their documents to reach them. A zero count still builds one epoch.
        blend_cache_dir: folder for the cached sample indices (``.npy``); default
            ``<folder of the first prefix>/index-cache``.
        eod_mask_loss: ``loss_mask`` is 0 where the token is the end-of-document id (Megatron-LM's
            ``--eod-mask-loss``).

    Returns:
        ``(train_ds, valid_ds)``: ``GPTDataset`` or ``BlendedDataset`` instances (``None`` for a
        split with a zero fraction and zero samples). ``ds[i]`` is a dict with ``tokens``,
        ``labels`` (int64 [seq_length]), ``loss_mask`` (float32 [seq_length]) and
        ``position_ids`` (int64 [seq_length]); blended datasets add ``dataset_id``.

    Raises:
        FileNotFoundError: a prefix's ``.bin`` or ``.idx`` is missing.
        ValueError: bad arguments, a corrupt index, or a split with no documents that is asked for
            samples.
    """
    prefixes, weights = parse_data_path(data_path)
    parse_split(split)  # the one split parser validates; megatron-core reads the numbers of the same string
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise DataError(f"seq_length must be a positive int, got {seq_length!r}")
    if len(num_samples) != 2 or any(not isinstance(n, int) or n < 0 for n in num_samples):
        raise DataError(f"num_samples must be (train, valid) non-negative ints, got {num_samples!r}")
    for attr in ("eod", "vocab_size", "unique_identifiers"):
        if not hasattr(tokenizer, attr):
            raise DataError(f"tokenizer {tokenizer!r} lacks the attribute {attr!r} megatron-core needs")

    infos = [validate_indexed_dataset(p) for p in prefixes]
    for prefix in prefixes:
        check_tokenizer_record(prefix, tokenizer)

    if blend_cache_dir is None:
        blend_cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    os.makedirs(blend_cache_dir, exist_ok=True)
    check_index_cache(blend_cache_dir)
    if torch.distributed.is_initialized():
        # Every rank checks the cache before megatron-core's rank 0 starts writing to it (its builder has
        # rank 0 build first, then the others read): a rank still checking would meet half-written files.
        torch.distributed.barrier()
    # megatron-core keys its cache by paths and settings; the files' sizes and times key it by content
    # too, so replacing the data never reuses stale indices.
    blend_cache_dir = os.path.join(blend_cache_dir, _data_fingerprint(prefixes))
    os.makedirs(blend_cache_dir, exist_ok=True)

    config = _GPTConfig(
        random_seed=int(seed),
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        # Without torch.distributed, megatron-core's BlendedDataset calls get_rank() when its
        # cache misses; so the shared path stays None there and _GPTDataset takes its own.
        path_to_cache=blend_cache_dir if torch.distributed.is_initialized() else None,
        gpt_index_cache_dir=blend_cache_dir,
    )
    if config.mock:
        raise DataError("internal error: megatron-core treated the data as mock data")
    # Never build the test split: it is unused and an empty one would make megatron-core loop.
    config.split_matrix = [config.split_matrix[0], config.split_matrix[1], None]

    names = ("train", "valid")
    for i, name in enumerate(names):
        if num_samples[i] > 0 and config.split_matrix[i] is None:
            raise DataError(
                f"split {split!r} gives the {name} set no documents but {num_samples[i]} {name} samples were requested"
            )
        if config.split_matrix[i] is None:
            continue
        for info in infos:
            if _split_document_range(config.split_matrix[i], info.num_sequences) == 0:
                raise DataError(
                    f"the {name} part of split {split!r} holds no document of {info.prefix!r} "
                    f"({info.num_sequences} documents); use more data or a larger {name} fraction"
                )

    builder = BlendedMegatronDatasetBuilder(_GPTDataset, [num_samples[0], num_samples[1], 0], lambda: True, config)
    train_ds, valid_ds, _ = builder.build()
    return train_ds, valid_ds


class MicroBatchIterator:
    """Micro-batches of a dataset in Megatron-LM's pretraining order, for one data-parallel rank.

    The global sample stream is ``consumed_samples, consumed_samples + 1, ...``. Each micro-step
    takes the next ``micro_batch_size * dp_size`` indices; data-parallel rank ``r`` gets indices
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of that chunk (as Megatron-LM's
    ``MegatronPretrainingSampler`` with ``drop_last``). Iteration stops (``StopIteration``) when
    fewer than ``micro_batch_size * dp_size`` samples remain; there is no wrap-around.

    Each item is a dict of tensors: ``tokens`` and ``labels`` int64 [B, S], ``loss_mask``
    float32 [B, S] and ``position_ids`` int64 [B, S] with ``B = micro_batch_size``.

    Args:
        dataset: indexable dataset whose items are dicts with those keys (e.g. from
            :func:`build_gpt_datasets`).
        micro_batch_size: samples per rank per micro-step.
        consumed_samples: global samples already consumed (all ranks together), to resume.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: data-parallel group size.
    """

    KEYS = ("tokens", "labels", "loss_mask", "position_ids")
    _DTYPES = {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
    }

    def __init__(
        self, dataset, micro_batch_size: int, consumed_samples: int = 0, dp_rank: int = 0, dp_size: int = 1
    ) -> None:
        if dataset is None:
            raise DataError("MicroBatchIterator: dataset is None")
        for name, value, low in (
            ("micro_batch_size", micro_batch_size, 1),
            ("consumed_samples", consumed_samples, 0),
            ("dp_size", dp_size, 1),
            ("dp_rank", dp_rank, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"MicroBatchIterator: {name} must be an int >= {low}, got {value!r}")
        if dp_rank >= dp_size:
            raise DataError(f"MicroBatchIterator: dp_rank={dp_rank} must be < dp_size={dp_size}")
        total = len(dataset)
        if consumed_samples > total:
            raise DataError(
                f"MicroBatchIterator: consumed_samples={consumed_samples} exceeds the dataset size {total}"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.total_samples = total
        self._consumed = consumed_samples

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed so far (all data-parallel ranks); save it to resume."""
        return self._consumed

    @property
    def global_micro_batch(self) -> int:
        """Samples consumed globally per micro-step: ``micro_batch_size * dp_size``."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-steps left before exhaustion."""
        return (self.total_samples - self._consumed) // self.global_micro_batch

    def __iter__(self) -> MicroBatchIterator:
        return self

    def sample_indices(self) -> list[int]:
        """Dataset indices of this rank's next micro-batch (without consuming them)."""
        start = self._consumed + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._consumed + self.global_micro_batch > self.total_samples:
            raise StopIteration(
                f"dataset exhausted: {self._consumed} of {self.total_samples} samples consumed, a "
                f"micro-step needs {self.global_micro_batch}"
            )
        items = [self.dataset[i] for i in self.sample_indices()]
        batch = {}
        for key in self.KEYS:
            if key not in items[0]:
                if key == "position_ids":
                    continue
                raise KeyError(f"MicroBatchIterator: dataset items lack the key {key!r}")
            batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items]).to(self._DTYPES[key])
        self._consumed += self.global_micro_batch
        return batch
