"""A stateful predictor replayed pass by pass over recorded routing, as `SpeculativeMoE` calls it.

A `Predictor.stateful` predictor keeps the routing it saw at earlier passes, so it cannot be called on many tokens
at once: it is reset at each sequence's first pass (a generate call), told `start_pass(i)` (the pass's index in its
sequence), then called once per MoE layer with that pass's tokens and their routing so far. One loop does that for
the simulator's candidates (`specmoe.sim.predictions.predictor_candidates`: multi-token prefill passes and decode
steps of a `RoutingStream`) and for the evaluation's scores (`specmoe.training.evaluate.decode_replay`: one pass per
token of a `RoutingTrace` sequence).
"""

# Shape legend: N tokens, T tokens of one pass, L MoE layers, k top-k, H hidden, E experts

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch


@torch.no_grad()
def replay_stateful(predictor, ids: torch.Tensor, hidden: Mapping[int, torch.Tensor], pass_offsets: Sequence[int],
                    seq_starts, hidden_size: int, device=None,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[int, list[dict[int, torch.Tensor]]]]:
    """Run `predictor` over the passes [pass_offsets[p], pass_offsets[p + 1]) of the tokens in `ids`.

    Args:
        predictor: a bound predictor with `reset`, `start_pass` and `predict`.
        ids: [N, L, k] the routed ids of every token (indices are token offsets).
        hidden: layer -> [N, H] hidden state entering that MoE layer, where recorded (zeros elsewhere: read by
            none of the predictors that run without them).
        pass_offsets: P + 1 rising token offsets.
        seq_starts: token offsets at which a sequence starts (the predictor is reset there).
        hidden_size: H.
        device / dtype: where (and as what) the predictor gets its inputs (default: where `ids` are; the
            hidden states' own dtype).

    Yields:
        (p, per layer {target layer: scores [T, E]}) for each pass p, in order.
    """
    device = ids.device if device is None else torch.device(device)
    ids = ids.to(device)
    L = ids.shape[1]
    zeros = torch.zeros(1, hidden_size, device=device)
    index = 0
    for p in range(len(pass_offsets) - 1):
        a, b = pass_offsets[p], pass_offsets[p + 1]
        if a in seq_starts:
            predictor.reset()
            index = 0
        predictor.start_pass(index)
        index += 1
        rows, per_layer = ids[a:b], []  # [T, L, k]
        for layer in range(L):
            h = hidden[layer][a:b].to(device, dtype) if layer in hidden else zeros.expand(b - a, -1)  # [T, H]
            per_layer.append(predictor.predict(layer, h, rows[:, : layer + 1]))
        yield p, per_layer
