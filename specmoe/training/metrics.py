"""How well scores [B, E] foresee routed top-k sets [B, k]: recall / precision within the m best-scored
experts, top-n accuracy of the primary expert, exact-set match.

* recall@m: |best m  &  routed| / |routed|  (what a prefetch of m experts would have covered);
* precision@m: |best m  &  routed| / m;
* top-n: the primary (highest-weight) routed expert is among the n best-scored;
* exact: the best |routed| experts are exactly the routed set.

m is given as multiples of k (m = k, 2k, 4k by default) so the names read the same for every model.
"""

# Shape legend: B rows (token, target layer pairs), E experts, k top-k, M largest m or n

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_MULTIPLES = (1, 2, 4)
TOP_N = (1, 3, 5, 10)


class PredictionMetrics:
    """Accumulates metric sums over batches; `result()` gives the means.

    Args:
        top_k: k, experts routed per token.
        num_experts: E.
        multiples: m / k values for recall and precision.
        top_n: n values for top-n accuracy of the primary expert.
    """

    def __init__(self, top_k: int, num_experts: int, multiples: Sequence[int] = RECALL_MULTIPLES,
                 top_n: Sequence[int] = TOP_N):
        self.k, self.E = top_k, num_experts
        self.multiples, self.top_n = tuple(multiples), tuple(top_n)
        self.count = 0
        self.sums: dict[str, float] = {name: 0.0 for name in self.names()}

    def names(self) -> list[str]:
        out = [f"recall@{self._m_name(x)}" for x in self.multiples]
        out += [f"precision@{self._m_name(x)}" for x in self.multiples]
        return out + [f"top{n}" for n in self.top_n] + ["exact"]

    @staticmethod
    def _m_name(multiple: int) -> str:
        return "k" if multiple == 1 else f"{multiple}k"

    @torch.no_grad()
    def add(self, scores: torch.Tensor, routed: torch.Tensor) -> None:
        """scores [B, E] (higher = more likely); routed [B, k] ids, primary first, -1 = none (rows with none
        routed are skipped)."""
        keep = (routed >= 0).any(-1)
        scores, routed = scores[keep].float().cpu(), routed[keep].long().cpu()
        B, E = scores.shape[0], self.E
        if B == 0:
            return
        hot = torch.zeros(B, E + 1, dtype=torch.bool)
        hot.scatter_(1, torch.where(routed >= 0, routed, E), True)
        hot = hot[:, :E]  # [B, E]
        n_routed = hot.sum(-1)  # [B]
        M = min(E, max(max(self.multiples) * self.k, max(self.top_n)))
        best = scores.topk(M, dim=-1).indices  # [B, M]
        cum = hot.gather(1, best).long().cumsum(-1)  # [B, M] routed experts among the best j+1
        for x in self.multiples:
            m = min(x * self.k, E)
            name = self._m_name(x)
            self.sums[f"recall@{name}"] += (cum[:, m - 1] / n_routed).sum().item()
            self.sums[f"precision@{name}"] += (cum[:, m - 1] / m).sum().item()
        primary = routed[:, 0:1]  # [B, 1]
        for n in self.top_n:
            self.sums[f"top{n}"] += (best[:, : min(n, M)] == primary).any(-1).sum().item()
        exact = cum.gather(1, (n_routed.clamp(max=M) - 1)[:, None]).squeeze(1) == n_routed  # [B]
        self.sums["exact"] += exact.sum().item()
        self.count += B

    def result(self) -> dict[str, float]:
        """{"count": rows, metric: mean}; means are NaN when no row was added."""
        out = {"count": self.count}
        out.update({k: (v / self.count if self.count else float("nan")) for k, v in self.sums.items()})
        return out

    def merge(self, other: "PredictionMetrics") -> "PredictionMetrics":
        """Add another accumulator's sums into this one (same settings)."""
        self.count += other.count
        for k, v in other.sums.items():
            self.sums[k] += v
        return self
