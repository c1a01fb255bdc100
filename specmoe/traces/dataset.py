"""Routing traces in memory: load a trace directory, select sequences, split by sequence (seeded).

A sequence (one text window, or one prompt's prefill + decode) never straddles two splits, so a predictor
is always measured on text it has not seen.
"""

# Shape legend: N tokens, S sequences, L MoE layers, k top-k, H hidden, E experts

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..geometry import MoEGeometry
from ..io import read_safetensors
from ..runtime.adapters import RouterWeights
from .routing import Routing
from .shards import TraceManifest, read_manifest, read_shard

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class RoutingTrace(Routing):
    """A loaded trace: a `Routing` of whole sequences (every token its own decode pass) that also knows its
    geometry, its model's routers and its manifest; training's view (targets, context, splits).

    Args:
        geometry: routing geometry L/E/k/H.
        ids: [N, L, k] expert ids, primary expert first; -1 where not routed.
        weights: [N, L, k] routing weights.
        offsets: [S + 1] sequence s is tokens offsets[s]:offsets[s+1].
        hidden: {layer: [N, H]} fp16 hidden states entering those MoE layers.
        routers: the model's routers (one RouterWeights per MoE layer), when the trace saved them.
        manifest: the manifest it was loaded from, if any.
    """

    def __init__(self, geometry: MoEGeometry, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor,
                 hidden: dict[int, torch.Tensor] | None = None, routers: list[RouterWeights] | None = None,
                 manifest: TraceManifest | None = None):
        super().__init__(ids, None, dict(hidden or {}), num_experts=geometry.num_experts, weights=weights,
                         seq_offsets=offsets)
        self.geometry, self.routers, self.manifest = geometry, routers, manifest

    @cached_property
    def has_next(self) -> torch.Tensor:
        """[N] bool: token i + 1 belongs to the same sequence as token i (cross-token targets exist)."""
        out = torch.ones(self.num_tokens, dtype=torch.bool)
        out[self.offsets[1:] - 1] = False
        return out

    def targets(self, layers, tokens: torch.Tensor, lookahead: int, wrap: bool = True):
        """The routed ids a predictor at MoE layer l should foresee, for (token, layer) rows.

        Target layer t = l + d (d = 1..lookahead); t >= L means layer t - L of the next token of the same
        sequence (only with `wrap`).

        Args:
            layers: the source layer l, one int for every row or a long tensor [B] (one per row).
            tokens: token indices [B].

        Returns:
            (ids [B, D, k] primary first, -1 where invalid; valid [B, D] bool).
        """
        L, N = self.geometry.num_layers, self.num_tokens
        layers = torch.as_tensor(layers).expand(tokens.shape[0])  # [B]
        t = layers[:, None] + torch.arange(1, lookahead + 1)  # [B, D] flat target layers
        within = t < L
        cross = (t >= L) & (t < 2 * L) & self.has_next[tokens][:, None] if wrap else torch.zeros_like(within)
        row = tokens[:, None] + (t >= L).long()  # [B, D] the token whose routing is the target
        ids = self.ids[row.clamp(max=N - 1), (t % L)]  # [B, D, k]
        valid = within | cross
        ids = torch.where(valid[..., None], ids, -1)
        return ids, valid & (ids >= 0).any(-1)

    def context(self, layers, tokens: torch.Tensor, context: int) -> torch.Tensor:
        """Expert ids of layers l-C+1..l for (token, layer) rows, -1 before the first layer. -> [B, C, k]"""
        layers = torch.as_tensor(layers).expand(tokens.shape[0])  # [B]
        src = layers[:, None] - context + 1 + torch.arange(context)  # [B, C]
        ids = self.ids[tokens[:, None], src.clamp(min=0)]  # [B, C, k]
        return torch.where((src >= 0)[..., None], ids, -1)

    def select(self, sequences: torch.Tensor | Iterable[int]) -> "RoutingTrace":
        """The trace of the given sequences only, in the given order."""
        part = self.select_sequences(sequences)
        return RoutingTrace(self.geometry, part.ids, part.weights, part.seq_offsets, part.hidden, self.routers,
                            self.manifest)

    def split(self, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, "RoutingTrace"]:
        """{"train", "val", "test"}: disjoint sets of whole sequences (see `split_sequences`)."""
        return {name: self.select(idx) for name, idx in split_sequences(self.num_sequences, fractions, seed).items()}


def split_sequences(num_sequences: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Assign sequence indices to train / val / test by a seeded permutation.

    The same (num_sequences, fractions, seed) always gives the same split, on any machine.

    Args:
        num_sequences: how many sequences there are.
        fractions: train, val and test fractions, each > 0, summing to 1.
        seed: the permutation's seed.

    Returns:
        {"train": idx, "val": idx, "test": idx}, sorted long tensors that partition range(num_sequences).

    Raises:
        ValueError: fractions that are not three positive numbers summing to 1, or fewer than 3 sequences.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")
    if num_sequences < 3:
        raise ValueError(f"a split needs at least 3 sequences, the trace has {num_sequences}; collect or import "
                         "more sequences")
    n_val = max(1, round(fractions[1] * num_sequences))
    n_test = max(1, round(fractions[2] * num_sequences))
    n_train = num_sequences - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{num_sequences} sequences leave none for training with fractions {fractions}")
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(perm, [n_train, n_val, n_test])
    return {name: part.sort().values for name, part in zip(SPLITS, parts)}


class _Router(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)


def read_routers(path, geometry: MoEGeometry) -> list[RouterWeights]:
    """Routers saved by `shards.write_routers`, as RouterWeights (weight [E, H], bias [E] or None).

    Raises:
        ValueError: the file is corrupt or its routers do not match `geometry`; the message names the file.
    """
    tensors = read_safetensors(path, what="router weights")
    routers = []
    for layer in range(geometry.num_layers):
        weight = tensors.get(f"router.{layer}.weight")
        if weight is None or tuple(weight.shape) != (geometry.num_experts, geometry.hidden_size):
            raise ValueError(f"{path}: router.{layer}.weight is missing or not [{geometry.num_experts}, "
                             f"{geometry.hidden_size}]")
        bias = tensors.get(f"router.{layer}.bias")
        routers.append(RouterWeights(_Router(weight, bias), "weight", "bias" if bias is not None else None))
    return routers


def load_traces(directory, geometry: MoEGeometry | None = None, hidden: bool | Iterable[int] = True,
                max_tokens: int | None = None, progress: bool = True) -> RoutingTrace:
    """Load a trace directory written by `specmoe collect` / `collect_traces`.

    Args:
        directory: the trace directory (manifest.json + shards).
        geometry: when given, traces of another geometry are refused.
        hidden: load the hidden states (True: every layer kept; False: none; or a list of layers).
        max_tokens: stop after the shard that reaches this many tokens (whole sequences only).
        progress: show a progress bar over shards.

    Raises:
        FileNotFoundError: no manifest or a missing shard. ValueError: a corrupt, truncated or foreign shard,
        or a geometry mismatch; the message names the file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if geometry is not None:
        geometry.check_matches(manifest.geometry, what=f"trace at {directory}")
    geo = manifest.geometry
    if hidden is True:
        keep = set(manifest.hidden_layers)
    elif hidden is False:
        keep = set()
    else:
        keep = set(hidden)
        if not keep <= set(manifest.hidden_layers):
            raise ValueError(f"{directory} kept hidden states of layers {list(manifest.hidden_layers)}, not "
                             f"{sorted(keep - set(manifest.hidden_layers))}; collect with --hidden-layers")
    parts, total = [], 0
    for info in tqdm(manifest.shards, desc="load traces", unit="shard", disable=not progress or len(manifest.shards) < 2):
        shard = read_shard(directory / info.file, geo)
        if shard.num_tokens != info.tokens or shard.num_sequences != info.sequences:
            raise ValueError(f"{directory / info.file} holds {shard.num_tokens} tokens / {shard.num_sequences} "
                             f"sequences, the manifest says {info.tokens} / {info.sequences}")
        shard.hidden = {layer: h for layer, h in shard.hidden.items() if layer in keep}
        parts.append(shard)
        total += shard.num_tokens
        if max_tokens is not None and total >= max_tokens:
            break
    offsets, start = [torch.zeros(1, dtype=torch.long)], 0
    for shard in parts:
        offsets.append(shard.offsets[1:] + start)
        start += shard.num_tokens
    routers = None
    if manifest.routers:
        path = directory / manifest.routers
        if path.is_file():
            routers = read_routers(path, geo)
        else:  # routing-only uses (history, interlayer, plain simulate) need no routers; the others say so
            logger.warning("%s names %s, which is missing: loading the routing without the model's routers (the "
                           "pre-gate and hidden-state predictors will refuse this trace)", directory / "manifest.json",
                           path)
    return RoutingTrace(
        geometry=geo,
        ids=torch.cat([s.ids for s in parts]),
        weights=torch.cat([s.weights for s in parts]),
        offsets=torch.cat(offsets),
        hidden={layer: torch.cat([s.hidden[layer] for s in parts]) for layer in sorted(keep)},
        routers=routers,
        manifest=manifest,
    )
