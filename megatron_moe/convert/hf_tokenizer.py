"""The run's sentencepiece tokenizer in a form transformers loads offline, and a generation config.

``tokenizer.model`` is the sentencepiece file itself; ``tokenizer_config.json`` names
``LlamaTokenizer`` (transformers builds its fast tokenizer from the .model file, no download) with
the model's special pieces, no dummy prefix (``add_prefix_space: false``, ``legacy: false``: the
project's tokenizers are trained without one) and no automatic BOS/EOS, as the training data was
tokenized (documents end with EOS, nothing is prepended). When transformers is installed the same
tokenizer is also written as ``tokenizer.json``: transformers 5's ``AutoTokenizer`` loads phi3 and
phimoe directories from that file only. For ``model_type`` qwen2 it substitutes Qwen2's byte-level
tokenizer class whatever the files say: load those exports with ``LlamaTokenizer.from_pretrained``.
tests/convert/test_export_hf.py checks that transformers' tokenizer gives the same ids as ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_moe.convert.source import ConversionError
from megatron_moe.data.tokenizer import SentencePieceTokenizer


def special_token_ids(tokenizer: SentencePieceTokenizer) -> dict[str, int]:
    """bos/eos/pad token ids of ``tokenizer`` (those it defines), as config.json names them."""
    ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eos, "pad_token_id": tokenizer.pad}
    return {k: v for k, v in ids.items() if v >= 0}


def load_tokenizer(model_path: str | Path, setting: str) -> SentencePieceTokenizer:
    """The sentencepiece tokenizer at ``model_path`` (given by ``setting``, for the message);
    ConversionError naming the file and the setting if it is missing or unreadable."""
    try:
        return SentencePieceTokenizer(str(model_path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{setting} {model_path}: {e}; pass --tokenizer-model FILE.model") from None


def write_tokenizer(tokenizer: SentencePieceTokenizer, output: Path, max_length: int) -> list[str]:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into ``output``."""
    shutil.copyfile(tokenizer.model_path, output / "tokenizer.model")
    t = tokenizer
    ids = {"bos_token": t.bos, "eos_token": t.eos, "unk_token": t.unk, "pad_token": t.pad}
    special = {name: t.id_to_piece(i) for name, i in ids.items() if i >= 0}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, "legacy": False, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    written = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        from transformers import LlamaTokenizer
    except ImportError:  # the .model file alone is enough for LlamaTokenizer
        return written
    fast = LlamaTokenizer.from_pretrained(str(output), local_files_only=True)
    fast.backend_tokenizer.save(str(output / "tokenizer.json"))
    return written + ["tokenizer.json"]


def write_generation_config(output: Path, special_ids: dict[str, int]) -> str:
    """generation_config.json with the special token ids (greedy decoding, transformers' defaults otherwise)."""
    config = {"_from_model_config": False, **special_ids}
    (output / "generation_config.json").write_text(json.dumps(config, indent=2))
    return "generation_config.json"
