"""The routing geometry of an MoE model: what runtime, predictors and traces agree on."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MoEGeometry:
    """Shape of a model's routing.

    Args:
        num_layers: L, the number of MoE layers (dense layers are not counted).
        num_experts: E, routed experts per MoE layer.
        top_k: k, experts chosen per token per layer.
        hidden_size: H, width of the hidden state entering an MoE layer.
    """

    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEGeometry.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEGeometry.top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoEGeometry":
        try:
            return cls(**{k: int(data[k]) for k in ("num_layers", "num_experts", "top_k", "hidden_size")})
        except KeyError as err:
            raise ValueError(f"geometry is missing {err.args[0]!r}: {data!r}") from None

    def check_matches(self, other: "MoEGeometry", what: str = "predictor") -> None:
        """Raise ValueError naming every field where `other` differs from this geometry."""
        diffs = [
            f"{k}: {what} has {getattr(other, k)}, model has {getattr(self, k)}"
            for k in ("num_layers", "num_experts", "top_k", "hidden_size")
            if getattr(self, k) != getattr(other, k)
        ]
        if diffs:
            raise ValueError(f"{what} was built for another routing geometry ({'; '.join(diffs)})")

    def __str__(self) -> str:
        return f"L={self.num_layers} E={self.num_experts} k={self.top_k} H={self.hidden_size}"
