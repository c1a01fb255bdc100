"""Inter-layer predictor: a small transformer encoder over the expert ids of the last C MoE layers.

Each of the C known layers becomes one input token: the sum of the embeddings of its k routed experts
(experts of different layers are different entities, so the table has a block of rows per layer), plus an
embedding of its position j in the context of layer l (which stands for the layer and the position). D
query tokens follow, one per target layer l+1..l+D (a target past the last layer is a layer of the next
token). The encoder's output at query d is scored against output embeddings of the target layer's E
experts.
"""

# Shape legend: B tokens, E experts, L MoE layers, k top-k, C context layers, D lookahead, M model width

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import MoEGeometry
from .base import register_predictor
from .trainable import TrainablePredictor


def context_window(ids: torch.Tensor, layer: int, context: int) -> torch.Tensor:
    """The expert ids of layers layer-C+1..layer from ids [B, >=layer+1, k], -1-padded on the left. -> [B, C, k]"""
    lo = layer - context + 1
    window = ids[:, max(lo, 0) : layer + 1]  # [B, <=C, k]
    if lo < 0:
        pad = torch.full((ids.shape[0], -lo, ids.shape[2]), -1, dtype=ids.dtype, device=ids.device)
        window = torch.cat([pad, window], dim=1)
    return window


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block, written out so that one call is a dozen ops (it runs per layer)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, ff), nn.Linear(ff, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, M]
        B, S, M = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, M // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, S, M)  # [B, S, M]
        a = self.proj(a)
        if p:
            a = F.dropout(a, p)
        x = x + a
        f = self.fc2(F.relu(self.fc1(self.ln2(x))))
        if p:
            f = F.dropout(f, p)
        return x + f


class InterLayerNet(nn.Module):
    def __init__(self, L: int, E: int, C: int, D: int, dim: int, layers: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.L, self.E, self.C, self.D = L, E, C, D
        # Input expert embeddings: one block of E + 1 rows per source layer (row E: no expert routed), and a
        # block L for context positions before the first layer.
        self.expert = nn.Embedding((L + 1) * (E + 1), dim)
        self.context_pos = nn.Parameter(torch.randn(L, C, dim) * 0.02)  # context slot j when predicting at l
        self.query = nn.Parameter(torch.randn(L, D, dim) * 0.02)  # query for target l + 1 + d
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Parameter(torch.randn(L, E, dim) * dim**-0.5)  # output expert embeddings
        self.out_bias = nn.Parameter(torch.zeros(L, E))
        nn.init.normal_(self.expert.weight, std=0.02)
        src = torch.arange(L)[:, None] - C + 1 + torch.arange(C)[None]  # [L, C] source layer of slot j
        self.register_buffer("offsets", torch.where(src >= 0, src, L) * (E + 1), persistent=False)  # [L, C]
        self.register_buffer("target_layers", (torch.arange(L)[:, None] + 1 + torch.arange(D)[None]) % L,
                             persistent=False)  # [L, D]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C + D, M] context and query tokens -> [B, D, M] normalised query outputs."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, self.C :])

    def forward(self, layers: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Training: layers [B] (one source layer l per row), context [B, C, k] expert ids of layers l-C+1..l
        (-1 = none) -> logits [B, D, E]."""
        B = context.shape[0]
        flat = context.remainder(self.E + 1) + self.offsets[layers][:, :, None]  # [B, C, k]; -1 -> row E
        x = self.expert(flat).sum(2) + self.context_pos[layers]  # [B, C, M]
        h = self._encode(torch.cat([x, self.query[layers]], dim=1))  # [B, D, M]
        tl = self.target_layers[layers]  # [B, D]
        every = (h @ self.out.view(-1, h.shape[-1]).t()).view(B, self.D, self.L, self.E)  # [B, D, L, E]
        picked = every.gather(2, tl[:, :, None, None].expand(B, self.D, 1, self.E)).squeeze(2)  # [B, D, E]
        return picked + self.out_bias[tl]

    @torch.no_grad()
    def prepare(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s slices for `run_prepared`, gathered and transposed once."""
        tl = self.target_layers[layer]  # [D]
        return (self.offsets[layer][None, :, None], self.context_pos[layer], self.query[layer][None],
                self.out_bias[tl][:, None, :].contiguous(), self.out[tl].transpose(1, 2).contiguous())

    def run_prepared(self, prepared: tuple[torch.Tensor, ...], context: torch.Tensor) -> torch.Tensor:
        """The runtime: every row at one layer, with `prepare(layer)`'s tensors. -> logits [B, D, E]"""
        offsets, pos, query, bias, out_t = prepared
        x = self.expert(context.remainder(self.E + 1) + offsets).sum(2) + pos  # [B, C, M]
        h = self._encode(torch.cat([x, query.expand(x.shape[0], -1, -1)], dim=1))  # [B, D, M]
        return torch.baddbmm(bias, h.transpose(0, 1), out_t).transpose(0, 1)  # [D, B, E] -> [B, D, E]


@register_predictor("interlayer")
class InterLayerPredictor(TrainablePredictor):
    """Transformer encoder over the routed expert ids of the last `context` MoE layers.

    Args:
        geometry: the model's routing geometry.
        lookahead: D, target layers l+1..l+D.
        context: C, known layers l-C+1..l fed to the encoder (the current layer included).
        wrap: predict the next token's first layers from the last layers.
        dim, layers, heads, ff, dropout: encoder width, depth, heads, feed-forward width and dropout.
    """

    def __init__(self, geometry: MoEGeometry, lookahead: int = 2, context: int = 3, wrap: bool = True,
                 dim: int = 128, layers: int = 2, heads: int = 4, ff: int = 256, dropout: float = 0.1):
        super().__init__(geometry, lookahead, wrap)
        if context < 1 or dim < 1 or layers < 1 or heads < 1 or dim % heads:
            raise ValueError(f"need context >= 1, layers >= 1 and dim divisible by heads; got context={context}, "
                             f"dim={dim}, layers={layers}, heads={heads}")
        self.context, self.dim, self.layers, self.heads, self.ff, self.dropout = context, dim, layers, heads, ff, dropout
        self.module = InterLayerNet(geometry.num_layers, geometry.num_experts, context, lookahead, dim, layers,
                                    heads, ff, dropout)

    def train_logits(self, trace, layers, tokens):
        context = trace.context(layers, tokens, self.context).to(self.device)  # [B, C, k]
        return self.module(layers.to(self.device), context)

    def prepare(self, layer):
        return self.module.prepare(layer)

    def runtime_logits(self, layer, hidden, history):
        return self.module.run_prepared(self.prepared(layer), context_window(history, layer, self.context))

    def config(self):
        return {"lookahead": self.lookahead, "context": self.context, "wrap": self.wrap, "dim": self.dim,
                "layers": self.layers, "heads": self.heads, "ff": self.ff, "dropout": self.dropout}
