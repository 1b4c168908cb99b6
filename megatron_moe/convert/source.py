"""A model to convert: its project Config and its weights under this project's parameter names.

Readers (:mod:`.hf`, :mod:`.megatron_format`, :mod:`.native`) return a :class:`ModelSource` (a
:class:`DenseSource` where only dense models are read) whose tensors are loaded on demand (one at a
time), so a converter holds at most the tensors it is working on plus its output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_moe.config import Config
from megatron_moe.model.transformer import MoETransformer


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, tensor or setting at fault."""


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``MoETransformer(cfg)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass
class ModelSource:
    """A model (dense or MoE): config plus lazily loaded weights.

    Attributes:
        cfg: the project configuration of the dense model.
        loaders: parameter name (``layers.0.attention.wq.weight``, ...) -> zero-argument function
            returning the tensor, in the layout of :class:`MoETransformer` (nn.Linear ``[out, in]``).
        origin: a short description for messages and meta.json (``"hf:/path"``...).
        extra: reader-specific details (the HF config dict, Megatron argument names).
        notes: what the reader changed or left out on purpose (printed by the command line).
    """

    cfg: Config
    loaders: dict[str, Callable[[], torch.Tensor]]
    origin: str
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The tensor ``name`` in ``dtype`` (None: as stored); raises ConversionError if it is absent or has
        the wrong shape."""
        if name not in self.loaders:
            raise ConversionError(f"{self.origin}: no tensor for parameter {name}")
        if self._shapes is None:
            self._shapes = expected_shapes(self.cfg)
        tensor = self.loaders[name]()
        want = self._shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise ConversionError(f"{self.origin}: {name} has shape {tuple(tensor.shape)}, the config "
                                  f"implies {want}")
        return (tensor if dtype is None else tensor.to(dtype)).contiguous()

    def check(self) -> None:
        """Raise ConversionError unless the source provides exactly the model's parameters."""
        want = expected_shapes(self.cfg)
        missing = sorted(set(want) - set(self.loaders))
        extra = sorted(set(self.loaders) - set(want))
        if missing:
            raise ConversionError(f"{self.origin}: missing {len(missing)} weights, e.g. {missing[:4]}")
        if extra:
            raise ConversionError(f"{self.origin}: weights this model has no place for, e.g. {extra[:4]}")

    def state_dict(self, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor, loaded in ``dtype`` (None: as stored). Holds the whole model in memory."""
        return {name: self.get(name, dtype) for name in self.loaders}


def require_dense(source: ModelSource) -> None:
    """Raise ConversionError unless ``source`` is a dense model (``moe.num_experts == 0``)."""
    if source.cfg.moe.num_experts != 0:
        raise ConversionError(f"{source.origin}: expected a dense model, config has moe.num_experts = "
                              f"{source.cfg.moe.num_experts}")


class DenseSource(ModelSource):
    """A :class:`ModelSource` that must be dense (``moe.num_experts == 0``): what upcycling reads."""

    def check(self) -> None:
        """Raise ConversionError unless the source is dense and provides exactly its parameters."""
        require_dense(self)
        super().check()


def require_empty_output(output, overwrite: bool) -> None:
    """Refuse to write a conversion into a directory that already holds something (a training run,
    an earlier export) unless ``overwrite`` (``--overwrite``) says so on purpose."""
    from pathlib import Path

    path = Path(output)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ConversionError(f"--output {path} is not empty; choose a new directory, or pass --overwrite to "
                              "write into it anyway")
