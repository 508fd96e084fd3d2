"""DiffuASR's sequential U-Net (SU-Net), the denoiser of its pseudo-prefix (docs/peers.md, "DiffuASR").

The k generated item vectors [B, k, D] are read as an image of k channels and side sqrt(D)
(D = 64: 8 x 8), so that 2-D convolutions mix neighbouring embedding dimensions while every
channel stays one sequence position. The network is a small DDPM-style U-Net: residual blocks
conditioned on (time embedding + guide embedding), stride-2 downsampling, nearest-neighbour
upsampling, skip connections. The public code's settings are the defaults: channel multipliers
(1, 2, 2, 2), two residual blocks per level, no attention (its attention resolution, 16, is
larger than the 8 x 8 image). GroupNorm has groups of 4 channels and the conditioning enters as
a scale and shift after it (_ResBlock).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adarec.errors import ConfigError

from .peer_schedule import timestep_embedding


def square_side(hidden_size: int) -> int:
    """sqrt(hidden_size); the SU-Net needs a square image per item vector."""
    side = math.isqrt(hidden_size)
    if side * side != hidden_size:
        raise ConfigError(f"diffuasr reshapes each item vector into a square image, so model.hidden_size must be "
                         f"a perfect square (16, 36, 64, 100, ...); got {hidden_size}")
    return side


def _norm(channels: int) -> nn.GroupNorm:
    # Groups of 4 channels (at these widths, 8 to 16 channels): a group of one channel would
    # normalise away every per-channel shift before it.
    return nn.GroupNorm(max(1, channels // 4), channels, eps=1e-6)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the conditioning embedding (time + guide) scales and shifts the
    second normalisation's output: h = norm2(h) (1 + scale) + shift (improved-diffusion's
    scale-shift norm). Added before the normalisation, as DDPM's U-Net does, a per-channel shift
    would be removed by it wherever a group is one channel wide, and the guide lost with it."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SUNet(nn.Module):
    """eps_theta(x_t, t, guide): x_t [B, k, D], t [B] (0-based steps), guide [B, G] -> [B, k, D]."""

    def __init__(self, positions: int, hidden_size: int, guide_size: int, channels: int = 8,
                 mults: tuple[int, ...] = (1, 2, 2, 2), res_blocks: int = 2, dropout: float = 0.1):
        super().__init__()
        self.side = square_side(hidden_size)
        self.channels = channels
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # The guide (the summed history) is embedded by its own MLP and added to the time embedding.
        self.guide_mlp = nn.Sequential(nn.Linear(guide_size, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(positions, channels, 3, padding=1)
        self.down, skips, cin, side = nn.ModuleList(), [channels], channels, self.side
        for level, mult in enumerate(mults):
            blocks = nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(_ResBlock(cin, channels * mult, emb_dim, dropout))
                cin = channels * mult
                skips.append(cin)
            # Halve the image while it has an even side; a 1 x 1 image stays as it is.
            sample = level < len(mults) - 1 and side % 2 == 0 and side > 1
            self.down.append(nn.ModuleDict({"blocks": blocks,
                                            "sample": nn.Conv2d(cin, cin, 3, stride=2, padding=1) if sample
                                            else nn.Identity()}))
            if sample:
                side //= 2
            if level < len(mults) - 1:
                skips.append(cin)
        self.mid = nn.ModuleList([_ResBlock(cin, cin, emb_dim, dropout), _ResBlock(cin, cin, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            blocks = nn.ModuleList()
            for _ in range(res_blocks + 1):
                blocks.append(_ResBlock(cin + skips.pop(), channels * mult, emb_dim, dropout))
                cin = channels * mult
            self.up.append(nn.ModuleDict({"blocks": blocks,
                                          "sample": nn.Conv2d(cin, cin, 3, padding=1) if level > 0
                                          else nn.Identity()}))
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, positions, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        # In the weights' dtype (float32 under autocast, bf16 in a bf16 engine).
        dtype = self.conv_in.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.channels).to(dtype)) + self.guide_mlp(guide.to(dtype))
        h = self.conv_in(x.to(dtype).reshape(b, k, self.side, self.side))
        hs = [h]
        for level, stage in enumerate(self.down):
            for block in stage["blocks"]:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.down) - 1:
                h = stage["sample"](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for stage in self.up:
            for block in stage["blocks"]:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if not isinstance(stage["sample"], nn.Identity):
                # Back to the size of the skip it meets next (a level that did not halve stays).
                h = stage["sample"](F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))).reshape(b, k, d)
