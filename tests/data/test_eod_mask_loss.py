"""--eod-mask-loss reaches megatron-core's GPTDataset: no loss where the input token ends a document."""

import torch

from megatron_moe.data.datasets import build_gpt_datasets
from megatron_moe.data.tokenizer import SentencePieceTokenizer


def test_loss_mask_is_zero_exactly_at_end_of_document_tokens(loop_corpus):
    tokenizer = SentencePieceTokenizer(loop_corpus["tokenizer"])
    cache = str(loop_corpus["root"] / "cache")
    masked, _ = build_gpt_datasets([loop_corpus["prefix"]], "90,10,0", tokenizer, 32, 5, (20, 0),
                                   blend_cache_dir=cache, eod_mask_loss=True)
    plain, _ = build_gpt_datasets([loop_corpus["prefix"]], "90,10,0", tokenizer, 32, 5, (20, 0),
                                  blend_cache_dir=cache)
    tokens = torch.stack([masked[i]["tokens"] for i in range(20)])
    assert (tokens == tokenizer.eod).any()  # the samples cross document boundaries
    loss_mask = torch.stack([masked[i]["loss_mask"] for i in range(20)])
    assert torch.equal(loss_mask, (tokens != tokenizer.eod).float())
    assert torch.equal(torch.stack([plain[i]["loss_mask"] for i in range(20)]), torch.ones_like(loss_mask))
