"""The SASRec backbone as the ICLRec/ELCRec code builds it (docs/method.md section 1).

Item + learned position embedding -> LayerNorm(eps 1e-12) -> dropout gives the sequence
embedding E^0; post-LN Transformer blocks (2 heads, FFN 4D, exact GELU) encode it. Sequences
are left-padded, so the newest item sits at position L-1 and the causal mask never lets a real
position look at a later one. Attention runs through scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12


def attention_mask(input_ids: torch.Tensor, causal: torch.Tensor | None = None,
                   reference_padding: bool = False) -> torch.Tensor:
    """Bool [B, 1, L, L]: True where query i may attend key j (j <= i and key j is an item).

    A query with no allowed key (a padding position left of every item) attends to itself only:
    SDPA returns NaN for an all-False row, and attending to itself keeps its output a function of
    its own position, independent of the user and of how many padding columns the batch has
    (docs/method.md, "Trimmed batches"). With `reference_padding` it attends to every key
    uniformly instead, items and padding, which is what the reference code's additive -10000 mask
    produces: its output then pools the whole row, and ELCRec's contrast over full-width views
    relies on that (section 2.5). Real queries never see padding either way. `causal` is a
    precomputed lower-triangular [>= L, >= L] bool (its last L rows and columns are used:
    sequences are left-padded).
    """
    length = input_ids.shape[1]
    if causal is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    causal = causal[-length:, -length:]
    allowed = causal & (input_ids > 0)[:, None, None, :]
    stranded = ~allowed.any(-1, keepdim=True)
    if reference_padding:
        return allowed | stranded
    own = torch.eye(length, dtype=torch.bool, device=input_ids.device)
    return allowed | (own & stranded)


class TransformerBlock(nn.Module):
    """Post-LN block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, hidden: int, heads: int, hidden_dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        ctx = ctx.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        ffn = self.ffn_out(F.gelu(self.ffn_in(x)))
        return self.ffn_norm(x + self.dropout(ffn))


class SequenceEncoder(nn.Module):
    """Embeddings (rows: 0 padding, 1..N items, N+1 mask id) and the Transformer stack."""

    def __init__(self, num_items: int, max_len: int, hidden: int, layers: int, heads: int,
                 hidden_dropout: float, attn_dropout: float, initializer_range: float = 0.02):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_embeddings = nn.Embedding(num_items + 2, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.embed_dropout = nn.Dropout(hidden_dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden, heads, hidden_dropout, attn_dropout) for _ in range(layers)
        )
        self.initializer_range = initializer_range
        self.apply(self._init_weights)
        # Built once rather than per call: two kernel launches saved on every encode.
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        # As the reference code: N(0, 0.02) for Linear and Embedding (the padding row too),
        # zero biases, LayerNorm (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The sequence embedding E^0 [B, W, D] of a batch of width W <= max_len.

        Sequences are left-padded, so column c of a width-W batch is column c + max_len - W of
        the full width: it takes that position's embedding, the last one for the newest item
        whatever the width (docs/method.md, "Trimmed batches")."""
        width = input_ids.shape[1]
        x = self.item_embeddings(input_ids) + self.position_embeddings.weight[self.max_len - width:][None]
        return self.embed_dropout(self.embed_norm(x))

    def encode(self, x: torch.Tensor, input_ids: torch.Tensor, reference_padding: bool = False) -> torch.Tensor:
        """Run the Transformer stack on an embedded sequence; input_ids give the masks
        (`reference_padding`: see attention_mask)."""
        mask = attention_mask(input_ids, self.causal, reference_padding)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def forward(self, input_ids: torch.Tensor, reference_padding: bool = False) -> torch.Tensor:
        return self.encode(self.embed(input_ids), input_ids, reference_padding)


def masked_mean(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean over the positions that hold an item; [B, L, D] -> [B, D]."""
    valid = (input_ids > 0).unsqueeze(-1).to(x.dtype)
    return (x * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def prefix_mean(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Causal pool: out[:, i] = mean of x over the item positions <= i; [B, L, D] -> [B, L, D].

    Positions before the first item get 0. At the last position this is `masked_mean`. Sums
    run in fp32 (a bf16 running sum drifts over 50 positions).
    """
    valid = (input_ids > 0).unsqueeze(-1)
    sums = (x.float() * valid).cumsum(1)
    counts = valid.float().cumsum(1).clamp_min(1.0)
    return (sums / counts).to(x.dtype)
