"""Per-layer auxiliary-loss coefficients (Skywork-MoE section 4.2, docs/routing.md §5).

Adaptive rule, applied once per optimiser step with the step's token-drop rate d_l of each layer:
    alpha_hat_l = min(xi * d_l, alpha_max);   alpha_l <- beta * alpha_l + (1 - beta) * alpha_hat_l.
Everything stays on the device (no host sync); the coefficients are training state and go into
checkpoints through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_SETTINGS = ("xi", "alpha_max", "beta", "alpha_0")


def _check_num_layers(num_layers: int) -> None:
    if num_layers < 0:  # 0: a dense model (nothing to balance)
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")


def _check_drop_rates(drop_rates: Tensor, num_layers: int) -> None:
    if tuple(drop_rates.shape) != (num_layers,):
        raise ValueError(f"drop_rates must have shape [{num_layers}], got {tuple(drop_rates.shape)}")


class AdaptiveAuxLossCoefficients:
    """Skywork's adaptive auxiliary-loss coefficients, one per MoE layer.

    Args:
        num_layers: L, the number of MoE layers.
        xi: xi >= 0 (Skywork: 1/5).
        alpha_max: upper bound >= 0 (Skywork: 0.01).
        beta: EMA factor in [0, 1) (Skywork: 0.99).
        alpha_0: initial coefficient (not published by Skywork); defaults to ``alpha_max``.
        device: where the [L] coefficient tensor lives.
    """

    kind = "adaptive"

    def __init__(
        self,
        num_layers: int,
        xi: float = 0.2,
        alpha_max: float = 0.01,
        beta: float = 0.99,
        alpha_0: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _check_num_layers(num_layers)
        if not xi >= 0:
            raise ValueError(f"moe.adaptive_xi must be >= 0, got {xi}")
        if not alpha_max >= 0:
            raise ValueError(f"moe.adaptive_alpha_max must be >= 0, got {alpha_max}")
        if not 0 <= beta < 1:
            raise ValueError(f"moe.adaptive_beta must be in [0, 1), got {beta}")
        alpha_0 = alpha_max if alpha_0 is None else alpha_0
        if not alpha_0 >= 0:
            raise ValueError(f"moe.adaptive_alpha_0 must be >= 0, got {alpha_0}")
        self.num_layers = num_layers
        self.xi = float(xi)
        self.alpha_max = float(alpha_max)
        self.beta = float(beta)
        self.alpha_0 = float(alpha_0)
        self._alpha = torch.full((num_layers,), self.alpha_0, dtype=torch.float32, device=device)

    @property
    def coefficients(self) -> Tensor:
        """alpha_l, shape [L], float32, on the configured device (do not modify in place)."""
        return self._alpha

    @torch.no_grad()
    def update(self, drop_rates: Tensor) -> None:
        """Apply one step of the rule with this step's drop rates d_l, shape [L] (tensor ops only)."""
        _check_drop_rates(drop_rates, self.num_layers)
        d = drop_rates.detach().to(device=self._alpha.device, dtype=torch.float32)
        alpha_hat = (self.xi * d).clamp(max=self.alpha_max)
        self._alpha.mul_(self.beta).add_(alpha_hat, alpha=1.0 - self.beta)

    def state_dict(self) -> dict[str, Any]:
        """Settings (floats/ints) and the coefficients (a CPU tensor)."""
        return {
            "kind": self.kind,
            "num_layers": self.num_layers,
            **{name: getattr(self, name) for name in _SETTINGS},
            "coefficients": self._alpha.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the coefficients. Raises ValueError on a different kind or num_layers and, when
        ``strict``, on different xi / alpha_max / beta / alpha_0 (pass ``strict=False`` to resume
        with changed settings on purpose)."""
        _check_state_header(state, self.kind, self.num_layers)
        if strict:
            for name in _SETTINGS:
                if float(state[name]) != getattr(self, name):
                    raise ValueError(
                        f"adaptive aux-loss setting {name} differs: checkpoint {state[name]}, "
                        f"config {getattr(self, name)} (load with strict=False to override)"
                    )
        self._alpha.copy_(state["coefficients"].to(torch.float32))


class ConstantAuxLossCoefficients:
    """A constant coefficient ``alpha`` for every layer, with the adaptive class's interface."""

    kind = "constant"

    def __init__(self, num_layers: int, alpha: float, device: torch.device | str | None = None) -> None:
        _check_num_layers(num_layers)
        if not alpha >= 0:
            raise ValueError(f"moe.aux_loss_coeff must be >= 0, got {alpha}")
        self.num_layers = num_layers
        self.alpha = float(alpha)
        self._alpha = torch.full((num_layers,), self.alpha, dtype=torch.float32, device=device)

    @property
    def coefficients(self) -> Tensor:
        """alpha for each layer, shape [L], float32."""
        return self._alpha

    def update(self, drop_rates: Tensor) -> None:
        """No-op (checks the shape only)."""
        _check_drop_rates(drop_rates, self.num_layers)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_layers": self.num_layers, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Check the header (kind, num_layers) and, when ``strict``, that alpha matches."""
        _check_state_header(state, self.kind, self.num_layers)
        if strict and float(state["alpha"]) != self.alpha:
            raise ValueError(
                f"constant aux-loss coefficient differs: checkpoint {state['alpha']}, config {self.alpha}"
            )


def _check_state_header(state: dict[str, Any], kind: str, num_layers: int) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"aux-loss coefficient state is of kind {state.get('kind')!r}, expected {kind!r}")
    if state.get("num_layers") != num_layers:
        raise ValueError(
            f"aux-loss coefficient state has num_layers={state.get('num_layers')}, "
            f"but this model has {num_layers} MoE layers"
        )
