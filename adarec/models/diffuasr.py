"""DiffuASR's generator: a diffusion model of the k items before a sequence (docs/peers.md, "DiffuASR").

DiffuASR augments the data rather than recommending: this model learns to generate a user's
k = model.prefix_items earlier items from the items that follow them; `adarec augment`
(adarec/augment_file.py) then prepends k generated items to every sequence, and a downstream
model (SASRec) trains on that file with data.augmented_prefix = k.

Training (one row per user, the engine's left-padded window of the last L items of s[:-3]):
a row whose window holds more than k items is a sample: x0 = the embeddings of the window's
first k items [k, D], guide = the rest of the window. For a user longer than L, "the first k
items" are those of the visible window: the task is the same (k items before an (L - k)-item
context), which is also what augmentation asks (docs/peers.md, "DiffuASR: decisions").

- guide g = MLP(sum of the guide items' embeddings), added to the time embedding of the SU-Net
  (adarec/models/su_net.py); with probability model.cond_drop the summed history is replaced by
  a learned null vector (classifier-free guidance);
- forward process over T = model.diffusion_steps with the linear schedule (peer_schedule.py),
  epsilon prediction, MSE averaged over k x D and then over the sample rows;
- sampling: DDIM with eta = 0 over model.sample_steps steps t_i = i * (T // S), with
  eps = eps_c + w (eps_c - eps_u), w = model.guidance_weight (w = 0: one conditional pass);
- rounding: the item whose embedding has the largest cosine with a generated vector.

Validation metric (ours; the paper evaluates only the downstream model): for each user whose
evaluation input holds more than k items, remove the first k of them, generate a k-block
before the rest, and rank every item by cosine with the block's last vector (the one next to
the guide); the target is the real k-th item. `eval_view` builds those rows for the engine.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from adarec.errors import ConfigError
from adarec.keyed_random import KeyedDraws, Streams, as_draws
from adarec.parallel import global_mean
from adarec.profiling import nvtx

from .eval_seed import add_eval_seed, eval_keys, set_eval_seed
from .peer_schedule import PeerSchedule, betas
from .scoring import inner_product_scores
from .su_net import SUNet, square_side


def ddim_steps(steps: int, sample_steps: int) -> list[int]:
    """The DDIM timesteps, ascending: t_i = i * (T // S) for i < S (0, 200, ..., 800 for T = 1000, S = 5)."""
    stride = steps // sample_steps
    return [i * stride for i in range(sample_steps)]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0): x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),
    x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps."""
    x0_hat = (x - torch.sqrt(1.0 - abar_t) * eps) / torch.sqrt(abar_t)
    return torch.sqrt(abar_next) * x0_hat + torch.sqrt(1.0 - abar_next) * eps


def split_block(input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded row -> (its first k items [B, k], the rest left-padded [B, L], has_sample [B]).

    has_sample: the row holds more than k items (a target block and a non-empty guide). Rows
    without a sample still get a (meaningless) block, so that no shape depends on the data.
    """
    width = input_ids.shape[1]
    count = (input_ids > 0).sum(1)
    first = width - count                                            # column of the oldest item
    cols = torch.arange(width, device=input_ids.device)
    block_cols = (first[:, None] + torch.arange(k, device=input_ids.device)).clamp(max=width - 1)
    block = input_ids.gather(1, block_cols)
    guide = torch.where(cols[None, :] >= (first + k)[:, None], input_ids, torch.zeros_like(input_ids))
    return block, guide, count > k


class DiffuASR(nn.Module):
    """Pseudo-prefix generator; forward(batch) -> (loss, terms), score(input_ids) -> [B, N+2]."""

    needs_views = False

    def __init__(self, cfg, num_items: int, max_len: int):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.k = int(cfg.prefix_items)
        if self.k >= max_len:
            raise ConfigError(f"model.prefix_items ({self.k}) must be smaller than the sequence length "
                              f"({max_len}): the guide is what is left of a window after its first k items")
        self.hidden_size = int(cfg.hidden_size)
        square_side(self.hidden_size)
        self.cond_drop = float(cfg.cond_drop)
        self.guidance_weight = float(cfg.guidance_weight)
        # Row 0 is padding, row N+1 the mask id DiffuASR has no use for (kept so that scores are [B, N+2]).
        # N(0, 1) init, as the public code's nn.Embedding; the diffusion loss trains it.
        self.item_embeddings = nn.Embedding(num_items + 2, self.hidden_size, padding_idx=0)
        self.null_guide = nn.Parameter(torch.randn(self.hidden_size) * cfg.initializer_range)
        self.denoiser = SUNet(self.k, self.hidden_size, self.hidden_size, cfg.denoiser_channels,
                              dropout=cfg.hidden_dropout)
        self.schedule = PeerSchedule(cfg.noise_schedule, cfg.diffusion_steps)
        steps = ddim_steps(cfg.diffusion_steps, cfg.sample_steps)
        abar = np.cumprod(1.0 - betas(cfg.noise_schedule, cfg.diffusion_steps))
        # alpha_bar before step 0 is 1: the last DDIM step returns x0_hat itself.
        abar_next = np.array([1.0] + [abar[t] for t in steps[:-1]])
        self.ddim_t = steps
        self.register_buffer("ddim_abar", torch.tensor(abar[steps], dtype=torch.float32), persistent=False)
        self.register_buffer("ddim_abar_next", torch.tensor(abar_next, dtype=torch.float32), persistent=False)
        # The run's seed keys the start noise of every generation. Saved with the weights, so that
        # `adarec evaluate` reproduces the run's numbers; read on the host only when loaded.
        add_eval_seed(self)
        self._views: dict[str, tuple] = {}

    @property
    def never_rank(self) -> tuple[int, int]:
        return (0, self.num_items + 1)

    def prepare(self, split, device, seed: int) -> None:
        """Only remembers the run's seed, which keys the start noise of every generation."""
        set_eval_seed(self, seed)

    # -- the model ---------------------------------------------------------------------------
    def guide_vector(self, guide_ids: torch.Tensor) -> torch.Tensor:
        """Sum of the guide items' embeddings [B, D] (padding rows are zero)."""
        return self.item_embeddings(guide_ids).sum(1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        rows, device = ids.shape[0], ids.device
        keys = batch.get("row_key")

        def draws(stream):
            return KeyedDraws(keys, stream) if keys is not None else as_draws(None, rows, device)

        block, guide_ids, has_sample = split_block(ids, self.k)
        x0 = self.item_embeddings(block)                                   # [B, k, D]
        t = torch.minimum((draws(Streams.TIMESTEPS).uniform((1,))[:, 0] * self.schedule.steps).long(),
                          torch.full_like(block[:, 0], self.schedule.steps - 1))
        noise = draws(Streams.PEER_NOISE).normal((self.k, self.hidden_size))
        dropped = draws(Streams.GUIDE_DROP).uniform((1,)) < self.cond_drop          # [B, 1]
        guide = torch.where(dropped, self.null_guide.to(x0.dtype)[None, :], self.guide_vector(guide_ids))
        x_t = self.schedule.q_sample(x0, t, noise.to(x0.dtype))
        with nvtx.phase("denoiser"):
            eps = self.denoiser(x_t, t, guide)
        with nvtx.phase("losses"):
            per_row = (eps.float() - noise).pow(2).mean(dim=(1, 2))
            weight = has_sample.float()
            loss = global_mean((per_row * weight).sum(), weight.sum())
        return loss, {"mse": loss.detach()}

    def generate(self, guide_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDIM (eta = 0) from start noise [B, k, D] with the guide items [B, L'] -> x0 [B, k, D]."""
        rows = guide_ids.shape[0]
        guide = self.guide_vector(guide_ids)
        guided = self.guidance_weight != 0.0
        if guided:
            guide = torch.cat([guide, self.null_guide.to(guide.dtype).expand(rows, -1)])
        x = noise
        for i in reversed(range(len(self.ddim_t))):
            t = torch.full((rows * (2 if guided else 1),), self.ddim_t[i], dtype=torch.long, device=x.device)
            eps = self.denoiser(torch.cat([x, x]) if guided else x, t, guide).float()
            if guided:
                cond, uncond = eps.chunk(2)
                eps = cond + self.guidance_weight * (cond - uncond)
            x = ddim_step(x.float(), eps, self.ddim_abar[i], self.ddim_abar_next[i])
        return x

    def start_noise(self, guide_ids: torch.Tensor) -> torch.Tensor:
        """Start noise [B, k, D] keyed by the row's contents and the run's seed (batch-independent)."""
        keys = eval_keys(self, guide_ids)
        return KeyedDraws(keys, Streams.REVERSE).normal((self.k, self.hidden_size))

    def item_table(self) -> torch.Tensor:
        """Every embedding row, unit-normalised [N+2, D] (float32): the generator ranks by cosine."""
        return torch.nn.functional.normalize(self.item_embeddings.weight.float(), dim=-1)

    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated block's last vector (the one right before the guide), unit-normalised [B, D]."""
        with nvtx.phase("reverse_process"):
            x0 = self.generate(input_ids, self.start_noise(input_ids))
        return torch.nn.functional.normalize(x0[:, -1].float(), dim=-1)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Generate the k-block before each (guide) row and score every item by its cosine with the
        block's last vector: [B, N+2]."""
        return inner_product_scores(self.user_query(input_ids), self.item_table())

    # -- evaluation rows -----------------------------------------------------------------------
    def eval_view(self, split, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, history, targets) of the generator's validation task (module docstring): users whose
        `which` input has more than k items; inputs = that input without its first k items (still
        left-padded), target = the k-th item, history = none ([U, 1] zeros). Built once per split."""
        source = getattr(split, f"{which}_input")
        cached = self._views.get(which)
        if cached is not None and cached[0] is source:
            return cached[1]
        ids = source.cpu().numpy()
        width = ids.shape[1]
        count = (ids > 0).sum(1)
        rows = np.flatnonzero(count > self.k)
        first = width - count[rows]
        kept = ids[rows]
        inputs = np.where(np.arange(width)[None, :] >= (first + self.k)[:, None], kept, 0)
        targets = kept[np.arange(len(rows)), first + self.k - 1]
        view = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(source.device)
                     for a in (inputs, np.zeros((len(rows), 1), dtype=np.int64), targets))
        self._views[which] = (source, view)
        return view
