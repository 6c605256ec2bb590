"""Pooling of a sequence of slice features into one volume feature, with one non-negative weight per slice.

Every pooling takes features `(B, N, F)` and returns the pooled feature `(B, F)` and the slice weights `(B, N)`,
non-negative and summing to 1 over the N slices of each volume. The weights are what the explanation tools show.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gandlf_dimlift.options import ConfigError

POOLINGS = ("attention", "gated", "mean", "max")


class MeanQueryAttention(nn.Module):
    """Multi-head attention of one query over a sequence, in plain matrix products (exportable to ONNX opset 11).

    The parameters are those of `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj`), initialised
    the same way, so checkpoints of either load into the other and give the same outputs. `nn.MultiheadAttention`
    itself cannot be exported at the opset GaNDLF uses (11): its packed projection needs `unflatten` (opset 13).
    """

    def __init__(self, features: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * features, features))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * features))
        self.out_proj = nn.Linear(features, features)
        # nn.MultiheadAttention's initialisation, in its order (so a seed gives the same weights)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attends `query` `(B, 1, F)` over `tokens` `(B, N, F)`.

        Returns:
            The attended feature `(B, F)` and the attention of every head over the tokens `(B, heads, N)`.
        """
        batch, n_tokens, features = tokens.shape
        head_size = features // self.heads
        w_q, w_kv = self.in_proj_weight.split([features, 2 * features])
        b_q, b_kv = self.in_proj_bias.split([features, 2 * features])
        q = nn.functional.linear(query, w_q, b_q).reshape(batch, self.heads, 1, head_size)
        k, v = nn.functional.linear(tokens, w_kv, b_kv).chunk(2, dim=-1)
        k = k.reshape(batch, n_tokens, self.heads, head_size).transpose(1, 2)
        v = v.reshape(batch, n_tokens, self.heads, head_size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_size)  # (B, heads, 1, N)
        attention = torch.softmax(scores, dim=-1)
        mixing = nn.functional.dropout(attention, self.dropout, self.training) if self.dropout else attention
        attended = torch.matmul(mixing, v).reshape(batch, features)  # heads side by side, as nn.MultiheadAttention
        return self.out_proj(attended), attention[:, :, 0]


class MeanQueryAttentionPooling(nn.Module):
    """Multi-head attention whose single query is the mean slice feature; keys and values are the slice features.

    The slice weights are the attention of the query over the slices, averaged over the heads.
    Without position encoding the result does not depend on the order of the slices.
    """

    def __init__(self, features: int, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or features % heads:
            divisors = [h for h in range(1, min(features, 32) + 1) if features % h == 0]
            raise ConfigError(
                f"model.heads = {heads} does not divide the encoder's {features} output features; "
                f"choose one of {divisors}."
            )
        self.attention = MeanQueryAttention(features, heads, dropout=dropout)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, per_head = self.attention(tokens.mean(dim=1, keepdim=True), tokens)
        return pooled, per_head.mean(dim=1)


class GatedAttentionPooling(nn.Module):
    """Ilse et al.'s gated attention: a_n = softmax_n(w . (tanh(V h_n) * sigmoid(U h_n))), pooled = sum_n a_n h_n."""

    def __init__(self, features: int, hidden: int = 128):
        super().__init__()
        self.tanh_branch = nn.Linear(features, hidden)
        self.gate_branch = nn.Linear(features, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(torch.tanh(self.tanh_branch(tokens)) * torch.sigmoid(self.gate_branch(tokens)))
        weights = torch.softmax(scores[..., 0], dim=1)
        return torch.bmm(weights.unsqueeze(1), tokens).squeeze(1), weights


class MeanPooling(nn.Module):
    """The mean of the slice features; every slice weighs 1/N."""

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.full(tokens.shape[:2], 1.0 / tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
        return tokens.mean(dim=1), weights


class MaxPooling(nn.Module):
    """The feature-wise maximum over slices; a slice's weight is the share of features where it is the maximum."""

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, winner = tokens.max(dim=1)
        counts = torch.zeros(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        counts.scatter_add_(1, winner, torch.ones_like(pooled))
        return pooled, counts / tokens.shape[2]


class SlicePositionEncoding(nn.Module):
    """Adds a learned projection of a sinusoidal code of each slice's relative position (0 to 1) and view.

    Positions are relative, so a volume with another number of slices than in training still gets codes in the
    trained range. The projection starts at zero: the encoding is learned, never imposed.
    """

    def __init__(self, features: int, frequencies: int = 8, views: int = 3):
        super().__init__()
        self.frequencies = frequencies
        self.views = views
        self.projection = nn.Linear(2 * frequencies + views, features)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def code(self, n_slices: int, view: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The `(n_slices, 2 * frequencies + views)` code of the slices of one view."""
        position = torch.linspace(0.0, 1.0, n_slices, device=device, dtype=dtype) if n_slices > 1 else torch.zeros(
            1, device=device, dtype=dtype
        )
        scales = math.pi * (2.0 ** torch.arange(self.frequencies, device=device, dtype=dtype))
        angles = position[:, None] * scales[None]
        onehot = torch.zeros(n_slices, self.views, device=device, dtype=dtype)
        onehot[:, view] = 1.0
        return torch.cat([torch.sin(angles), torch.cos(angles), onehot], dim=1)

    def forward(self, tokens: torch.Tensor, views: list[tuple[int, int]]) -> torch.Tensor:
        """Adds the encoding to tokens `(B, N, F)` made of consecutive runs `(view index, n_slices)`."""
        codes = torch.cat([self.code(n, v, tokens.device, tokens.dtype) for v, n in views], dim=0)
        return tokens + self.projection(codes)[None]


def make_pooling(name: str, features: int, heads: int = 8, hidden: int = 128) -> nn.Module:
    """Builds the pooling `name` for slice features of size `features`."""
    if name == "attention":
        return MeanQueryAttentionPooling(features, heads)
    if name == "gated":
        return GatedAttentionPooling(features, hidden)
    if name == "mean":
        return MeanPooling()
    if name == "max":
        return MaxPooling()
    raise ConfigError(f"model.pooling = {name!r} is not a slice pooling; choose one of {list(POOLINGS)}.")
