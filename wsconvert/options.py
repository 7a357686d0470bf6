"""ConversionOptions: the validated options shared by convert_model, plan_conversion and the CLI."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import InvalidOptionError
from .norms.bcn import validate_estimate
from .ws.standardize import validate_eps, validate_style

__all__ = ["ConversionOptions"]


def _patterns(name: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise InvalidOptionError(
            f"{name}={value!r} must be a list of glob patterns on dotted module paths, e.g. ['layer4.*']"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidOptionError(
                f"{name} contains {pattern!r}; each entry must be a non-empty glob string such as 'layer4.*'"
            )
    return patterns


NORMS = ("gn", "bcn")


def _norm_options(norm: object, bcn_estimate: object, gn: int | None) -> tuple[str, float | None]:
    """``norm`` (what replaces BatchNorm: "gn" GroupNorm, "bcn" BatchChannelNorm) and the BCN estimate rate."""
    if norm is not None and norm not in NORMS:
        raise InvalidOptionError(
            f"norm={norm!r} must be 'gn' (GroupNorm) or 'bcn' (Batch-Channel Normalization, arXiv:1903.10520)"
        )
    if norm is not None and gn is None:
        raise InvalidOptionError(
            f"norm={norm!r} replaces BatchNorm layers and needs the number of groups: pass gn=G as well (e.g. gn=32)"
        )
    norm = norm or "gn"
    if bcn_estimate is not None and norm != "bcn":
        raise InvalidOptionError(
            f"bcn_estimate={bcn_estimate!r} selects estimated BatchNorm inside Batch-Channel Normalization; "
            "pass norm='bcn' (and gn=G) with it"
        )
    return norm, validate_estimate(bcn_estimate)


@dataclass(frozen=True)
class ConversionOptions:
    """What to convert and how. Build it with ``ConversionOptions.build(...)``, which validates."""

    gn: int | None = None
    eps: float = 1e-5
    style: str = "standard"
    include: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())
    skip_depthwise: bool = False
    skip_unnormalized: bool = False
    norm: str = "gn"
    bcn_estimate: float | None = None
    preserve: bool = False  # keep the trained function: Adaptive WS gain/shift, GroupNorm affines (preserve.py)

    @classmethod
    def build(
        cls,
        *,
        gn: int | None = None,
        eps: float = 1e-5,
        style: str = "standard",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_depthwise: bool = False,
        skip_unnormalized: bool = False,
        norm: str | None = None,
        bcn_estimate: float | None = None,
        preserve: bool = False,
    ) -> ConversionOptions:
        if gn is not None and (isinstance(gn, bool) or not isinstance(gn, int) or gn < 1):
            raise InvalidOptionError(
                f"gn={gn!r} must be an integer >= 1 (the number of GroupNorm groups, e.g. 32), "
                "or None to keep the norm layers"
            )
        if not isinstance(skip_depthwise, bool):
            raise InvalidOptionError(f"skip_depthwise={skip_depthwise!r} must be True or False")
        if not isinstance(skip_unnormalized, bool):
            raise InvalidOptionError(f"skip_unnormalized={skip_unnormalized!r} must be True or False")
        if not isinstance(preserve, bool):
            raise InvalidOptionError(f"preserve={preserve!r} must be True or False")
        norm, bcn_estimate = _norm_options(norm, bcn_estimate, gn)
        return cls(
            gn=gn,
            eps=validate_eps(eps),
            style=validate_style(style),
            include=_patterns("include", include),
            exclude=_patterns("exclude", exclude),
            skip_depthwise=skip_depthwise,
            skip_unnormalized=skip_unnormalized,
            norm=norm,
            bcn_estimate=bcn_estimate,
            preserve=preserve,
        )

    def deselected_reason(self, paths: Sequence[str]) -> str | None:
        """Why the module at ``paths`` is left out by include/exclude, or None when it is selected.

        A module reachable at several paths is one object: converting it changes every path, so it is
        selected only when every one of its paths is.
        """
        for path in paths:
            for pattern in self.exclude:
                if fnmatch.fnmatchcase(path, pattern):
                    return f"excluded by pattern {pattern!r}" + (f" (at {path})" if len(paths) > 1 else "")
            if self.include and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
                return "matches no include pattern" + (f" (at {path})" if len(paths) > 1 else "")
        return None

    def to_dict(self) -> dict:
        return {
            "gn": self.gn,
            "eps": self.eps,
            "style": self.style,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "skip_depthwise": self.skip_depthwise,
            "skip_unnormalized": self.skip_unnormalized,
            "norm": self.norm,
            "bcn_estimate": self.bcn_estimate,
            "preserve": self.preserve,
        }
