"""The [circuit_breaker] policy table."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from proxy.config import Model
from proxy.units import Duration


class Config(Model):
    failure_threshold: int = Field(default=5, ge=1)
    recovery_timeout: Duration = 30.0
    failure_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])
    half_open_max: int = Field(default=1, ge=1)
    failure_ratio: float | None = Field(default=None, gt=0, le=1)
    window: Duration = 10.0
    min_requests: int = Field(default=10, ge=1)

    @field_validator("failure_statuses")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 500 <= s <= 599:
                raise ValueError(f"{s} is not a 5xx status: a 4xx is the client's doing, "
                                 "not an upstream failure")
        return v

    @model_validator(mode="after")
    def _durations(self) -> "Config":
        if self.recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be longer than 0")
        if self.window <= 0:
            raise ValueError("window must be longer than 0")
        return self
