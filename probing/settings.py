"""What every settings model shares: strict validation and upper bounds that say why.

The settings of a trial (training schedule, smoothing, the sweep spec's sections) are pydantic
models with this base, defined once where they are used and validated the same way from YAML.
"""

from __future__ import annotations

from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = ["Strict", "at_most"]


class Strict(BaseModel):
    """No unknown keys, no coercion (``"3"`` is not 3), no NaN or infinity, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def at_most(limit: float, reason: str):
    """An upper bound whose message says why it is there."""

    def check(value):
        if value is not None and value > limit:
            raise ValueError(f"must be <= {limit:,} ({reason}), got {value!r}")
        return value

    return AfterValidator(check)
