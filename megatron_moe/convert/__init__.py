"""Checkpoint converters: checkpoints in (Hugging Face, Megatron-LM, native), as they are or upcycled
from dense into MoE, and native checkpoints out to Hugging Face.

Modules, one job each:

- :mod:`.config_io`: rebuild a :class:`~megatron_moe.config.Config` from a checkpoint's meta.json.
- :mod:`.source`: :class:`ModelSource` (:class:`DenseSource`), a model as a config plus lazily read tensors.
- :mod:`.hf_config`: HF config.json <-> Config for llama, mistral, qwen2, phi3, mixtral, phimoe (grinmoe),
  and the reasons a model is not expressible in an HF architecture.
- :mod:`.hf_tensors`: parameter names <-> HF tensors (fused Phi-3 tensors, per-expert MoE tensors).
- :mod:`.hf`: read a Hugging Face directory (config.json + safetensors).
- :mod:`.verify`: compare an imported model with transformers' own.
- :mod:`.megatron_format`: read a Megatron-LM legacy torch checkpoint (TP shards merged).
- :mod:`.native`: read/write this project's checkpoints (model-only, step 0).
- :mod:`.upcycle`: dense -> MoE weights (copies or granular split), fresh router, verification.
- :mod:`.export_hf`: native -> Hugging Face (weights, config, tokenizer, generation config).
- :mod:`.hf_tokenizer`: the run's sentencepiece tokenizer as transformers loads it.
"""

from megatron_moe.convert.config_io import config_from_dict
from megatron_moe.convert.source import ConversionError, DenseSource, ModelSource

__all__ = ["ConversionError", "DenseSource", "ModelSource", "config_from_dict"]
