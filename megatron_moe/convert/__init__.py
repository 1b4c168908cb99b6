"""Checkpoint converters: dense checkpoints (Hugging Face, Megatron-LM, native) into MoE checkpoints
by sparse upcycling, and native checkpoints out to Hugging Face (Mixtral for MoE, Llama for dense).

Modules, one job each:

- :mod:`.config_io`: rebuild a :class:`~megatron_moe.config.Config` from a checkpoint's meta.json.
- :mod:`.source`: :class:`DenseSource`, a dense model as a config plus lazily read tensors.
- :mod:`.hf`: read a Hugging Face Llama/Mistral directory (config.json + safetensors).
- :mod:`.megatron_format`: read a Megatron-LM legacy torch checkpoint (TP shards merged).
- :mod:`.native`: read/write this project's checkpoints (model-only, step 0).
- :mod:`.upcycle`: dense -> MoE weights (copies or granular split), fresh router, verification.
- :mod:`.export_hf`: native -> Hugging Face, with the reasons when a model is not expressible.
"""

from megatron_moe.convert.config_io import config_from_dict
from megatron_moe.convert.source import ConversionError, DenseSource

__all__ = ["ConversionError", "DenseSource", "config_from_dict"]
