"""Inter-layer predictor: a small transformer encoder over the expert ids of the last C MoE layers.

Each of the C known layers becomes one input token: the sum of the embeddings of its k routed experts
(experts of different layers are different entities, so the table has L * E rows), plus a layer and a
position embedding. D query tokens, one per target layer l+1..l+D (layer embedding of the target, which
may be a layer of the next token), follow. The encoder's output at query d is scored against output
embeddings of the target layer's E experts.
"""

# Shape legend: B tokens, E experts, L MoE layers, k top-k, C context layers, D lookahead, M model width

from __future__ import annotations

import torch
from torch import nn

from ..geometry import MoEGeometry
from .base import register_predictor
from .trainable import TrainablePredictor, context_window


class InterLayerNet(nn.Module):
    def __init__(self, L: int, E: int, C: int, D: int, dim: int, layers: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.L, self.E, self.C, self.D = L, E, C, D
        self.pad = L * E
        self.expert = nn.Embedding(L * E + 1, dim, padding_idx=self.pad)  # input expert embeddings
        self.layer = nn.Embedding(2 * L, dim)  # source layers 0..L-1, targets up to 2L-1 (the next token)
        self.pos = nn.Embedding(C + D, dim)
        block = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Parameter(torch.randn(L, E, dim) * dim**-0.5)  # output expert embeddings
        self.out_bias = nn.Parameter(torch.zeros(L, E))
        nn.init.normal_(self.expert.weight, std=0.02)
        nn.init.normal_(self.layer.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.expert.weight[self.pad].zero_()

    def forward(self, layer: int, context: torch.Tensor) -> torch.Tensor:
        """context [B, C, k] expert ids of layers layer-C+1..layer (-1 = none) -> logits [B, D, E]."""
        B, C, _ = context.shape
        dev = context.device
        src = torch.arange(layer - C + 1, layer + 1, device=dev)  # [C]
        flat = torch.where((context >= 0) & (src[None, :, None] >= 0), src[None, :, None] * self.E + context,
                           self.pad)  # [B, C, k]
        x = self.expert(flat).sum(2) + self.layer(src.clamp(min=0)) + self.pos.weight[:C]  # [B, C, M]
        tgt = torch.arange(layer + 1, layer + 1 + self.D, device=dev)  # [D]
        q = (self.layer(tgt) + self.pos.weight[C:]).expand(B, -1, -1)  # [B, D, M]
        h = self.norm(self.encoder(torch.cat([x, q], dim=1))[:, C:])  # [B, D, M]
        tl = tgt % self.L
        return torch.einsum("bdm,dem->bde", h, self.out[tl]) + self.out_bias[tl]  # [B, D, E]


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
                 dim: int = 256, layers: int = 2, heads: int = 4, ff: int = 512, dropout: float = 0.1):
        super().__init__(geometry, lookahead, wrap)
        if context < 1 or dim < 1 or layers < 1 or heads < 1 or dim % heads:
            raise ValueError(f"need context >= 1, layers >= 1 and dim divisible by heads; got context={context}, "
                             f"dim={dim}, layers={layers}, heads={heads}")
        self.context, self.dim, self.layers, self.heads, self.ff, self.dropout = context, dim, layers, heads, ff, dropout
        self.module = InterLayerNet(geometry.num_layers, geometry.num_experts, context, lookahead, dim, layers,
                                    heads, ff, dropout)

    def forward(self, layer, context):
        return self.module(layer, context)

    def batch_inputs(self, trace, layer, tokens):
        return {"context": context_window(trace.ids[tokens], layer, self.context)}  # [B, C, k]

    def runtime_inputs(self, layer, hidden, history):
        return {"context": context_window(history, layer, self.context)}  # [T, C, k]

    def config(self):
        return {"lookahead": self.lookahead, "context": self.context, "wrap": self.wrap, "dim": self.dim,
                "layers": self.layers, "heads": self.heads, "ff": self.ff, "dropout": self.dropout}
