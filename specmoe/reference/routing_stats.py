"""Is routing learned? Statistics of a model's routing over held-out text, and a plot comparing models.

Per MoE layer:

* ``load [L][E]``: each expert's share of the layer's top-k assignments;
* ``load_entropy``: entropy of that load / log E (1 = every expert equally used);
* ``router_entropy``: mean over tokens of the entropy of softmax(router logits) / log E (1 = the router
  cannot tell experts apart; trained routers are decisive);
* ``top1_next_accuracy`` (layers 0..L-2): how often layer l's top-1 expert predicts layer l+1's, by the most
  frequent successor (a table fitted on the first half of the windows, scored on the second half), next to
  ``top1_next_baseline``, always guessing l+1's most frequent top-1 (same split);
* ``next_token_reuse``: share of a token's top-k experts at layer l that the next token routes to again.
"""

# Shape legend: N windows, T tokens per window, L MoE layers, E experts, k top-k, H hidden

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..measure.results import pyplot
from ..runtime.adapters import find_moe_layers
from ..traces.capture import capture_routing


@dataclass
class RoutingStats:
    """Routing statistics of one model over `tokens` held-out tokens (see the module docstring)."""

    tokens: int
    load: list[list[float]]
    load_entropy: list[float]
    router_entropy: list[float]
    top1_next_accuracy: list[float]
    top1_next_baseline: list[float]
    next_token_reuse: list[float]

    def summary(self) -> dict[str, float]:
        """Means over layers, and the busiest expert's share of the most unbalanced layer."""

        def mean(xs):
            return sum(xs) / len(xs) if xs else float("nan")

        return {
            "load_entropy": mean(self.load_entropy),
            "router_entropy": mean(self.router_entropy),
            "top1_next_accuracy": mean(self.top1_next_accuracy),
            "top1_next_baseline": mean(self.top1_next_baseline),
            "next_token_reuse": mean(self.next_token_reuse),
            "max_expert_share": max(max(row) for row in self.load),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def _entropy(p: torch.Tensor) -> torch.Tensor:  # [..., E] probabilities -> [...] nats
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def _transition_accuracy(top1: torch.Tensor, E: int) -> tuple[list[float], list[float]]:
    """top1 [N, T, L] -> (successor-table accuracy, marginal baseline) per layer pair, fit/score by windows."""
    N, _, L = top1.shape
    half = max(1, N // 2)
    fit, test = top1[:half].reshape(-1, L), top1[half:].reshape(-1, L)
    if test.numel() == 0:
        raise ValueError("routing statistics need at least 2 windows (one to fit, one to score)")
    acc, base = [], []
    for l in range(L - 1):
        table = torch.zeros(E, E).index_put_((fit[:, l], fit[:, l + 1]), torch.ones(fit.shape[0]), accumulate=True)
        guess = table.argmax(1)  # [E] most frequent successor of each expert (expert 0 for unseen ones)
        acc.append(float((guess[test[:, l]] == test[:, l + 1]).float().mean()))
        common = torch.bincount(fit[:, l + 1], minlength=E).argmax()
        base.append(float((test[:, l + 1] == common).float().mean()))
    return acc, base


@torch.no_grad()
def routing_statistics(model, windows: torch.Tensor, batch_size: int = 16, progress: bool = False) -> RoutingStats:
    """Run `model` over `windows` [N, T] (no padding) and measure its routing.

    Args:
        model: any model `specmoe.runtime.adapters.find_moe_layers` understands.
        windows: held-out token windows, at least 2.
        batch_size: windows per forward pass.
        progress: show a tqdm bar.

    Returns:
        The statistics. Router entropy uses each layer's router logits on the hidden state it saw.

    Raises:
        ValueError: fewer than 2 windows.
    """
    if windows.dim() != 2 or windows.shape[0] < 2:
        raise ValueError(f"windows must be [N >= 2, T], got shape {tuple(windows.shape)}")
    moe = find_moe_layers(model)
    geo = moe.geometry
    L, E, k = geo.num_layers, geo.num_experts, geo.top_k
    device = next(model.parameters()).device
    N, T = windows.shape
    counts = torch.zeros(L, E, dtype=torch.float64)
    ent_sum = torch.zeros(L, dtype=torch.float64)
    reuse_sum = torch.zeros(L, dtype=torch.float64)
    top1 = torch.empty(N, T, L, dtype=torch.long)
    with capture_routing(model, hidden_layers=range(L), moe=moe) as cap:
        for i in tqdm(range(0, N, batch_size), desc="routing stats", disable=not progress, leave=False):
            x = windows[i : i + batch_size]  # [b, T]
            b = x.shape[0]
            cap.passes.clear()
            model(input_ids=x.to(device))
            (routed,) = cap.passes  # one forward pass: ids/weights [b*T, L, k]
            order = routed.weights.argsort(-1, descending=True)
            ids = routed.ids.gather(-1, order)  # [b*T, L, k], best first
            counts += torch.zeros(L, E + 1, dtype=torch.float64).scatter_add_(
                1, ids.transpose(0, 1).reshape(L, -1).clamp_min(-1) % (E + 1),
                torch.ones(L, b * T * k, dtype=torch.float64))[:, :E]
            for layer in moe.layers:
                logits = layer.router.logits(routed.hidden[layer.index].to(device)).float()  # [b*T, E]
                ent_sum[layer.index] += _entropy(logits.softmax(-1)).sum().double().cpu()
            top1[i : i + b] = ids[..., 0].reshape(b, T, L)
            seq = ids.reshape(b, T, L, k)
            same = (seq[:, 1:, :, :, None] == seq[:, :-1, :, None, :]).any(-1).sum(-1)  # [b, T-1, L]
            reuse_sum += same.double().sum((0, 1)) / k
    load = counts / counts.sum(1, keepdim=True)  # [L, E]
    acc, base = _transition_accuracy(top1, E)
    return RoutingStats(
        tokens=N * T,
        load=load.tolist(),
        load_entropy=(_entropy(load) / math.log(E)).tolist(),
        router_entropy=(ent_sum / (N * T) / math.log(E)).tolist(),
        top1_next_accuracy=acc,
        top1_next_baseline=base,
        next_token_reuse=(reuse_sum / (N * max(T - 1, 1))).tolist(),
    )


def plot_routing(stats: dict[str, dict], path, title: str = "") -> None:
    """Plot `{model name: RoutingStats.to_dict()}` side by side (per-layer curves, sorted load heatmaps).

    Reads only the dicts (as stored in a results JSON), so the figure can be remade from the JSON alone.
    """
    plt = pyplot()

    names = list(stats)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    curves = [("router_entropy", "router entropy / log E  (1 = uniform)"),
              ("load_entropy", "expert load entropy / log E  (1 = even)"),
              ("top1_next_accuracy", "layer l top-1 predicts layer l+1 top-1"),
              ("next_token_reuse", "experts reused by the next token")]
    for ax, (key, label) in zip(axes.flat[:4], curves):
        for i, name in enumerate(names):
            ax.plot(stats[name][key], marker=".", color=f"C{i}", label=name)
            if key == "top1_next_accuracy":
                ax.plot(stats[name]["top1_next_baseline"], ls="--", color=f"C{i}", label=f"{name}: most frequent")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("MoE layer")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, name in zip(axes.flat[4:], names[:2]):
        load = torch.tensor(stats[name]["load"]).sort(1, descending=True).values  # [L, E], busiest first
        im = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{name}: expert load, sorted per layer", fontsize=10)
        ax.set_xlabel("expert rank")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
