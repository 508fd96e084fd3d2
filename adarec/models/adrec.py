"""ADRec: auto-regression plus token-level diffusion (docs/peers.md, "ADRec").

One training row per user with a target at every position:

- input x = LayerNorm(Dropout(E[ids])) (dropout first, as the public code), no position embedding;
- the CAM, `model.num_layers` causal Transformer blocks, turns it into the condition c [B, L, D] once
  per forward;
- every target token gets its own timestep t and noise: x_t = q_sample(E[target]) where the target
  is an item, x_t = E[0] with t = 0 where it is padding;
- the denoiser (`model.denoiser_layers` causal blocks) reads c + lambda (x_t + MLP(sin-emb(t 1000/T)))
  with a fixed lambda and predicts x0;
- losses: CE of x0_hat . E^T over embedding rows 0..N (padding included in the softmax, as the
  public code) at every target, and the MSE to the target embedding averaged per row over its
  targets, then over rows. `loss_parts` keeps them apart for train.grad_merge = pcgrad.

The blocks follow the public code's: separate q/k/v projections with Xavier-normal weights, post-LN
(eps 1e-12), tanh-GELU FFN with dropout on its activation, and its attention mask, which masks
padding QUERY rows (they attend uniformly to every key up to themselves) and never padding keys:
real positions attend to the padding on their left. That changes numbers, so it is followed.

Staged training: `prepare` pre-trains the item embeddings with a SASRec-style model (CE, no
position embedding) for `model.pretrain_epochs`; `begin_epoch` keeps them frozen for the first
`model.freeze_epochs` epochs.

Inference denoises the last token only (history positions carry their clean target embeddings with
t = 0). The denoiser is causal, so the history rows never see the last one: their keys and values
are computed at the first reverse step and reused, and each step runs the last row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adarec.keyed_random import KeyedDraws, Streams, as_draws
from adarec.parallel import global_mean
from adarec.profiling import nvtx

from .eval_seed import add_eval_seed, eval_keys, set_eval_seed
from .losses import ItemCrossEntropy, scored_rows
from .peer_schedule import PeerSchedule, RespacedSchedule, spaced_timesteps, timestep_embedding
from .scoring import inner_product_scores

LAYER_NORM_EPS = 1e-12
# Stage 1 (pre-training) runs its own small loop with the public code's optimizer settings; the
# run's train section is not visible to the model.
PRETRAIN_BATCH = 512
PRETRAIN_LR = 1e-3
PRETRAIN_WEIGHT_DECAY = 1e-5
PRETRAIN_INIT_STD = 0.1


class CausalBlock(nn.Module):
    """Post-LN block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(W2 Drop(GELU_tanh(W1 x))))."""

    def __init__(self, hidden: int, heads: int, hidden_dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(hidden_dropout)
        for layer in (self.query, self.key, self.value, self.attn_out, self.ffn_in, self.ffn_out):
            nn.init.xavier_normal_(layer.weight)        # biases keep torch's default, as the public code

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, hidden = x.shape
        return x.view(batch, rows, self.heads, hidden // self.heads).transpose(1, 2)

    def _project(self, x: torch.Tensor, valid: torch.Tensor):
        """q, k, v [B, H, R, dh]. A padding query is zeroed: its scores are all 0, so it attends
        uniformly to the keys it may see, as the public code's -1e9 fill of padding query rows."""
        q = self._heads(self.query(x)) * valid[:, None, :, None].to(x.dtype)
        return q, self._heads(self.key(x)), self._heads(self.value(x))

    def _attend(self, q, k, v, causal: bool) -> torch.Tensor:
        """Scaled dot-product attention; with causal, query i sees keys 0..i (top-left aligned)."""
        drop = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        batch, _, rows, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(batch, rows, -1)

    def _finish(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        ffn = self.ffn_out(self.dropout(F.gelu(self.ffn_in(x), approximate="tanh")))
        return self.ffn_norm(x + self.dropout(ffn))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """All rows [B, L, D]; valid [B, L] marks the item positions."""
        q, k, v = self._project(x, valid)
        return self._finish(x, self._attend(q, k, v, causal=True))

    def split_forward(self, hist, last, hist_valid, last_valid, cache=None):
        """The same block on the history rows [B, L-1, D] and the last row [B, 1, D] computed as two
        groups. `cache` = (history output, k, v) of an earlier call with the same history: the
        history rows attend causally, so they never depend on the last row and are reused as they
        are. Returns (history output, last output, cache)."""
        q_l, k_l, v_l = self._project(last, last_valid)
        if cache is None:
            q_h, k_h, v_h = self._project(hist, hist_valid)
            # History query i sees keys 0..i; the last key is masked for every history query, so
            # its value leaves no trace (the cached result holds for any last row).
            ctx_h = self._attend(q_h, torch.cat([k_h, k_l], 2), torch.cat([v_h, v_l], 2), causal=True)
            cache = (self._finish(hist, ctx_h), k_h, v_h)
        hist_out, k_h, v_h = cache
        ctx_l = self._attend(q_l, torch.cat([k_h, k_l], 2), torch.cat([v_h, v_l], 2), causal=False)
        return hist_out, self._finish(last, ctx_l), cache


def _stack(cfg, layers: int) -> nn.ModuleList:
    return nn.ModuleList(CausalBlock(cfg.hidden_size, cfg.num_heads, cfg.hidden_dropout, cfg.attn_dropout)
                         for _ in range(layers))


class _PretrainNet(nn.Module):
    """Stage 1: SASRec without position embedding, as the public `pretrain` model:
    E[ids] -> LayerNorm (eps 1e-5) -> Dropout(emb_dropout) -> causal blocks; full CE over rows 0..N."""

    def __init__(self, cfg, num_items: int, item_ce: ItemCrossEntropy):
        super().__init__()
        self.item_ce = item_ce
        self.item_embeddings = nn.Embedding(num_items + 2, cfg.hidden_size, padding_idx=0)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.emb_dropout)
        self.blocks = _stack(cfg, cfg.num_layers)
        for module in self.modules():               # N(0, 0.1) weights and zero biases, as the public SASRec
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, PRETRAIN_INIT_STD)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()  # padding stays 0 (docs/peers.md: the public init draws it)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        h = self.dropout(self.norm(self.item_embeddings(ids)))
        for block in self.blocks:
            h = block(h, ids > 0)
        return _ce_rows(self.item_ce, h, self.item_embeddings.weight, batch["target_pos"], batch.get("target_rows"))


def _ce_rows(item_ce: ItemCrossEntropy, hidden, weight, target_pos, target_rows=None) -> torch.Tensor:
    """Cross-entropy of hidden . E[0..N]^T at the positions with a target (padding row 0 is in the
    softmax, the mask row N+1 is not), averaged over the global batch's targets."""
    flat, target = scored_rows(hidden, target_pos, target_rows)
    return item_ce.global_mean(flat, weight[:-1], target, ignore_index=0)


class ADRec(nn.Module):
    """forward(batch) -> (loss, {"ce", "mse"}); score(input_ids) -> [B, N+2] (module docstring)."""

    needs_views = False
    # Real positions attend to the padding on their left (the public code's mask), so outputs
    # depend on a batch's padding width: its batches keep max_len (docs/method.md, "Trimmed batches").
    trims_batches = False
    # The CE implementation; build_model replaces it with one from the kernels config.
    item_ce = ItemCrossEntropy()

    def __init__(self, cfg, num_items: int, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.hidden = cfg.hidden_size
        # torch's N(0, 1) init, as the public code's embedding when it is not pre-trained.
        self.item_embeddings = nn.Embedding(num_items + 2, cfg.hidden_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.cam = _stack(cfg, cfg.num_layers)
        self.denoiser = _stack(cfg, cfg.denoiser_layers)
        self.time_embed = nn.Sequential(nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size), nn.SiLU(),
                                        nn.Linear(4 * cfg.hidden_size, cfg.hidden_size))
        self.schedule = PeerSchedule(cfg.noise_schedule, cfg.diffusion_steps)
        # Inference over model.sample_steps of the T steps (all of them by default, as the public
        # code); fewer are respaced like DiffuRec's (peer_schedule.RespacedSchedule).
        self.sample_timesteps = spaced_timesteps(cfg.diffusion_steps, cfg.sample_steps)
        self.reverse_schedule = RespacedSchedule(cfg.noise_schedule, cfg.diffusion_steps, self.sample_timesteps)
        self.steps = cfg.diffusion_steps
        self.time_scale = 1000.0 / cfg.diffusion_steps
        self.lam = cfg.lambda_uncertainty
        self.frozen = False
        self.loss_parts: tuple[torch.Tensor, torch.Tensor] | None = None
        # The evaluation seed travels with the weights (a resumed run does not call prepare).
        add_eval_seed(self)

    @property
    def never_rank(self) -> tuple[int, int]:
        return (0, self.num_items + 1)

    # ---- staged training -------------------------------------------------------------------

    def prepare(self, split, device, seed: int) -> None:
        """Fix the evaluation seed; stage 1 when model.pretrain_epochs > 0: pre-train a SASRec-style
        model on the training rows and start from its item embeddings (deterministic under seed)."""
        set_eval_seed(self, seed)
        if self.cfg.pretrain_epochs > 0:
            pretrained = pretrain_embeddings(self.cfg, split, device, seed, self.item_ce)
            with torch.no_grad():
                self.item_embeddings.weight.copy_(pretrained)

    def begin_epoch(self, epoch_index: int) -> None:
        """Stage 2: the item embeddings get no gradient in the first model.freeze_epochs epochs."""
        self.frozen = epoch_index < self.cfg.freeze_epochs

    def embedding_weight(self) -> torch.Tensor:
        weight = self.item_embeddings.weight
        return weight.detach() if self.frozen else weight

    # ---- shared pieces ---------------------------------------------------------------------

    def condition(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The CAM output c [B, L, D]."""
        x = self.emb_norm(self.emb_dropout(F.embedding(input_ids, weight, padding_idx=0)))
        valid = input_ids > 0
        for block in self.cam:
            x = block(x, valid)
        return x

    def denoiser_input(self, c: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """c + lambda (x_t + MLP(sin-emb(t 1000 / T)))."""
        time = self.time_embed(timestep_embedding(t.float() * self.time_scale, self.hidden).to(c.dtype))
        return c + self.lam * (x_t + time)

    # ---- training --------------------------------------------------------------------------

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, target = batch["input_ids"], batch["target_pos"]
        rows, length = input_ids.shape
        weight = self.embedding_weight()
        key = batch.get("row_key")
        steps = KeyedDraws(key, Streams.TIMESTEPS) if key is not None else as_draws(None, rows, input_ids.device)
        noises = KeyedDraws(key, Streams.PEER_NOISE) if key is not None else as_draws(None, rows, input_ids.device)
        with nvtx.phase("encoder"):
            c = self.condition(input_ids, weight)
        with nvtx.phase("denoiser"):
            is_target = target > 0
            x0 = F.embedding(target, weight, padding_idx=0)
            t = torch.clamp((steps.uniform((length,)) * self.steps).long(), max=self.steps - 1)
            t = torch.where(is_target, t, torch.zeros_like(t))
            noise = noises.normal((length, self.hidden)).to(x0.dtype)
            x_t = torch.where(is_target[..., None], self.schedule.q_sample(x0, t, noise), x0)
            h = self.denoiser_input(c, x_t, t)
            valid = input_ids > 0
            for block in self.denoiser:
                h = block(h, valid)
        with nvtx.phase("losses"):
            ce = _ce_rows(self.item_ce, h, weight, target, batch.get("target_rows"))
            # Per row: the mean over its targets of the squared error summed over D / D; then the
            # mean over rows (the public code weights every row alike, not every token).
            mask = is_target.float()
            sq = (h.float() - x0.float()).pow(2).mean(-1)
            per_row = (sq * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            mse = global_mean(per_row.sum(), torch.full((), float(rows), device=per_row.device))
        self.loss_parts = (ce, mse)
        loss = ce + mse
        return loss, {"ce": ce.detach(), "mse": mse.detach()}

    # ---- inference -------------------------------------------------------------------------

    def _history(self, input_ids: torch.Tensor):
        """Denoiser inputs of the history rows (clean next-item embeddings, t = 0), the CAM output
        of the last row, and the query validity of both groups."""
        weight = self.item_embeddings.weight
        c = self.condition(input_ids, weight)
        valid = input_ids > 0
        # Position i's target is the next input item while position i holds an item.
        targets = input_ids[:, 1:] * valid[:, :-1]
        hist = self.denoiser_input(c[:, :-1], F.embedding(targets, weight), torch.zeros_like(targets))
        return hist, c[:, -1:], valid[:, :-1], valid[:, -1:]

    def _denoise_last(self, hist, c_last, x_t, t, hist_valid, last_valid, caches):
        """x0_hat of the last row [B, 1, D]; caches: one per block (None: compute the history)."""
        h, last = hist, self.denoiser_input(c_last, x_t, t)
        for i, block in enumerate(self.denoiser):
            h, last, caches[i] = block.split_forward(h, last, hist_valid, last_valid, caches[i])
        return last

    def _reverse(self, input_ids: torch.Tensor, reuse_history: bool) -> torch.Tensor:
        hist, c_last, hist_valid, last_valid = self._history(input_ids)
        rows = input_ids.shape[0]
        draws = KeyedDraws(eval_keys(self, input_ids), Streams.REVERSE)
        x_t = draws.normal((1, self.hidden)).to(c_last.dtype)
        caches = [None] * len(self.denoiser)
        for step in reversed(range(len(self.sample_timesteps))):
            # The denoiser is told the original timestep; the posterior uses the respaced index.
            t = torch.full((rows, 1), self.sample_timesteps[step], dtype=torch.long, device=input_ids.device)
            index = torch.full((rows, 1), step, dtype=torch.long, device=input_ids.device)
            if not reuse_history:
                caches = [None] * len(self.denoiser)
            x0_hat = self._denoise_last(hist, c_last, x_t, t, hist_valid, last_valid, caches)
            x_t = self.reverse_schedule.posterior_step(x0_hat, x_t, index,
                                                       draws.normal((1, self.hidden)).to(x_t.dtype))
        return x_t[:, 0]

    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The reverse process's last-token result [B, D] (fp32), scored against every embedding row."""
        with nvtx.phase("reverse_process"):
            return self._reverse(input_ids, reuse_history=True).float()

    def item_table(self) -> torch.Tensor:
        """Every embedding row [N+2, D] in float32: 0 padding, 1..N items, N+1 unused."""
        return self.item_embeddings.weight.float()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores of every embedding row in float32 [B, N+2]."""
        return inner_product_scores(self.user_query(input_ids), self.item_table())

    @torch.no_grad()
    def score_recomputed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """score() recomputing every row at every step, as the public code does (tests)."""
        return inner_product_scores(self._reverse(input_ids, reuse_history=False), self.item_table())


def pretrain_embeddings(cfg, split, device, seed: int, item_ce: ItemCrossEntropy) -> torch.Tensor:
    """Stage 1: train _PretrainNet for cfg.pretrain_epochs epochs (Adam lr 1e-3, weight decay 1e-5,
    batch 512) and return its item embeddings. Its own RNG stream: the caller's is left as it was."""
    from adarec.data import TrainBatchSampler

    device = torch.device(device)
    split = split.to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        net = _PretrainNet(cfg, split.num_items, item_ce).to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=PRETRAIN_LR, weight_decay=PRETRAIN_WEIGHT_DECAY)
        sampler = TrainBatchSampler(split, PRETRAIN_BATCH, seed + 1, device=device)
        for epoch in range(cfg.pretrain_epochs):
            for batch in sampler.epoch(epoch):
                optimizer.zero_grad(set_to_none=True)
                net(batch).backward()
                optimizer.step()
    return net.item_embeddings.weight.detach().clone()
