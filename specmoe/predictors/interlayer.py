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
        f = self.fc2(F.gelu(self.fc1(self.ln2(x))))
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

    def forward(self, layer: int | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """context [B, C, k] expert ids of layers l-C+1..l (-1 = none), l = `layer` for every row (an int) or
        per row (a long tensor [B]) -> logits [B, D, E]."""
        B, C = context.shape[0], self.C
        per_row = isinstance(layer, torch.Tensor)
        offsets = self.offsets[layer] if per_row else self.offsets[layer][None]  # [B or 1, C]
        flat = context.remainder(self.E + 1) + offsets[:, :, None]  # [B, C, k]; -1 -> row E
        x = self.expert(flat).sum(2) + self.context_pos[layer]  # [B, C, M]
        q = self.query[layer] if per_row else self.query[layer].expand(B, -1, -1)  # [B, D, M]
        x = torch.cat([x, q], dim=1)  # [B, C + D, M]
        for block in self.blocks:
            x = block(x)
        h = self.norm(x[:, C:])  # [B, D, M]
        tl = self.target_layers[layer]  # [B, D] or [D]
        if per_row:  # score every layer's experts, keep the target layer's
            every = (h @ self.out.view(-1, h.shape[-1]).t()).view(B, self.D, self.L, self.E)  # [B, D, L, E]
            picked = every.gather(2, tl[:, :, None, None].expand(B, self.D, 1, self.E)).squeeze(2)  # [B, D, E]
            return picked + self.out_bias[tl]
        scores = torch.baddbmm(self.out_bias[tl][:, None, :], h.transpose(0, 1), self.out[tl].transpose(1, 2))
        return scores.transpose(0, 1)  # [D, B, E] -> [B, D, E]


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

    def forward(self, layer, context):
        return self.module(layer, context)

    def train_logits(self, trace, layers, tokens):
        context = trace.context(layers, tokens, self.context).to(self.device)  # [B, C, k]
        return self.module(layers.to(self.device), context)

    def runtime_inputs(self, layer, hidden, history):
        return {"context": context_window(history, layer, self.context)}  # [T, C, k]

    def config(self):
        return {"lookahead": self.lookahead, "context": self.context, "wrap": self.wrap, "dim": self.dim,
                "layers": self.layers, "heads": self.heads, "ff": self.ff, "dropout": self.dropout}
