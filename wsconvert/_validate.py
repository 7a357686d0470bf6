"""Validators of option values that layers below the options share, torch-free so that the command reports a
bad ``--eps`` / ``--style`` / ``--bcn-estimate`` without importing torch (wsconvert/cli.py's docstring)."""

from __future__ import annotations

import math

from .errors import InvalidOptionError

__all__ = ["STYLE_NAMES", "validate_eps", "validate_estimate", "validate_style"]

# The Weight Standardization styles (wsconvert.ws.standardize.STYLES holds their formulas; a test checks the keys).
STYLE_NAMES = ("standard", "paper")


def validate_style(style: object) -> str:
    if not isinstance(style, str) or style not in STYLE_NAMES:
        raise InvalidOptionError(
            f"style={style!r} is not a weight standardization style; use one of {sorted(STYLE_NAMES)}"
        )
    return style


def validate_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise InvalidOptionError(
            f"eps={eps!r} must be a finite number > 0 (it keeps constant filters from dividing by zero); "
            "the default is 1e-5"
        )
    return float(eps)


def validate_estimate(rate: object, name: str = "bcn_estimate") -> float | None:
    """``rate`` as a float when 0 < rate <= 1, None for None; anything else is an InvalidOptionError."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 < rate <= 1:
        raise InvalidOptionError(
            f"{name}={rate!r} must be a rate r with 0 < r <= 1 (e.g. 0.01), the speed at which estimated BatchNorm "
            "updates its running statistics; 0 (the reference code's default) would never update them. "
            "Pass None for a plain BatchNorm part"
        )
    return float(rate)
