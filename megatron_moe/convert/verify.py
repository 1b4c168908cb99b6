"""Check an imported model against transformers' own model of the same Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_moe.convert.hf import read_hf_config
from megatron_moe.convert.source import ConversionError


def load_transformers_model(path: str | Path) -> torch.nn.Module:
    """transformers' model of the HF directory ``path`` in float32, eval mode, read offline.

    GRIN-MoE's released config says ``model_type: grinmoe`` (its own remote code); its format is
    PhiMoE's, so it is loaded as :class:`transformers.PhimoeForCausalLM` without running remote code.
    """
    try:
        import transformers
    except ImportError:
        raise ConversionError("--verify compares with transformers' model: pip install transformers") from None

    hf = read_hf_config(path)
    if hf.get("model_type") == "grinmoe":
        fields = {k: v for k, v in hf.items() if k not in ("model_type", "auto_map", "architectures")}
        config = transformers.PhimoeConfig(**fields)
        model = transformers.PhimoeForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    else:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"--verify: transformers cannot load {path}: {e}") from None
    return model.eval()


@torch.no_grad()
def compare_with_transformers(path: str | Path, model: torch.nn.Module, vocab_size: int, seq_len: int = 32,
                              batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(max |logit difference|, that / max |transformers logit|) of ``model`` against transformers' model
    of ``path`` on random tokens [batch, seq_len], both in eval mode."""
    reference = load_transformers_model(path)
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ref = reference(tokens).logits.float()
    diff = (model.eval()(tokens).float() - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)
