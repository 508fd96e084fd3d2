"""DiffuRec (Li, Sun, Li; TOIS 2023): the target item's embedding is diffused and rebuilt by a
Transformer "Approximator" that reads the history (docs/peers.md, "DiffuRec").

Training (one row per (user, target), adarec/data/prefixes.py): x0 is the target's raw
embedding, t ~ U{0..T-1}, x_t = q_sample(x0, t, eps). The Approximator adds a time embedding to
x_t, adds lambda * x_t (lambda ~ N(l, l), drawn elementwise over [B, L, H]) to every position of
the embedded history, runs bidirectional pre-LN Transformer blocks and reads x0_hat at the last
position. The loss is the cross-entropy of x0_hat . E^T over rows 0..N (the padding row is a
candidate, as in the public code). Scoring runs the ancestral reverse process from N(0, I) and
ranks by inner product with its result.

Kept from the public code (docs/peers.md, "DiffuRec"):
- no padding_idx (the padding vector is learned) and no position embedding;
- history = LayerNorm(Dropout(emb)), in that order; x0 is the embedding before both;
- the attention mask covers query rows, not keys: a real position attends to every position,
  padding included, and a padding position (whose whole score row the public code fills with
  -1e9, so that its softmax is uniform) attends uniformly to all positions. Zeroing the query
  of a padding position gives exactly that uniform row (every score 0), before the attention
  dropout as there;
- pre-LN blocks x + Drop(Attn(LN x)), x + Drop(FFN(LN x)), then a dropout on the block output;
  the FFN is tanh-GELU with a dropout before its output projection; LayerNorm eps 1e-12;
- PyTorch's default initialisation (the item embedding N(0, 1)), Xavier-normal for the attention
  output and the FFN weights; model.initializer_range is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adarec.keyed_random import GeneratorDraws, KeyedDraws, Streams
from adarec.profiling import nvtx

from .eval_seed import add_eval_seed, eval_keys, set_eval_seed
from .losses import ItemCrossEntropy
from .peer_schedule import PeerSchedule, RespacedSchedule, spaced_timesteps, timestep_embedding
from .scoring import inner_product_scores

LAYER_NORM_EPS = 1e-12


class DiffuRecBlock(nn.Module):
    """Pre-LN Transformer block with query-row padding (module docstring)."""

    def __init__(self, hidden: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.attn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.attn_out, self.ffn_in, self.ffn_out):
            nn.init.xavier_normal_(linear.weight)

    def forward(self, x: torch.Tensor, query_pad: torch.Tensor) -> torch.Tensor:
        """x [B, L, H]; query_pad [B, 1, L, 1] bool, True at padding positions."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # A zero query scores 0 against every key: the uniform row of the public -1e9 fill.
        q = q.masked_fill(query_pad, 0.0)
        drop = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = x + self.dropout(self.attn_out(ctx.transpose(1, 2).reshape(batch, length, hidden)))
        ffn = self.ffn_out(self.dropout(F.gelu(self.ffn_in(self.ffn_norm(x)), approximate="tanh")))
        return self.dropout(x + self.dropout(ffn))


class Approximator(nn.Module):
    """x0_hat = LN(Drop(Transformer(history + lambda * (x_t + MLP(sinusoid(t 1000 / T))))))[:, -1]."""

    def __init__(self, cfg, steps: int):
        super().__init__()
        hidden = cfg.hidden_size
        self.hidden = hidden
        self.time_scale = 1000.0 / steps
        self.lam = cfg.lambda_uncertainty
        # improved-diffusion's time_embed: H -> 4H -> H.
        self.time_embed = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
        self.blocks = nn.ModuleList(DiffuRecBlock(hidden, cfg.num_heads, cfg.hidden_dropout, cfg.attn_dropout)
                                    for _ in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, history: torch.Tensor, query_pad: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                lam_noise: torch.Tensor) -> torch.Tensor:
        """history [B, L, H] (embedded), query_pad [B, 1, L, 1], x_t [B, H], t [B] original timesteps,
        lam_noise [B, L, H] standard normal -> x0_hat [B, H]."""
        # Inputs in the weights' dtype: fp32 under autocast, bf16 under DeepSpeed's bf16 engine.
        emb = timestep_embedding(t.float() * self.time_scale, self.hidden).to(self.time_embed[0].weight.dtype)
        x_t = x_t + self.time_embed(emb)
        lam = self.lam + self.lam * lam_noise
        h = history + (lam * x_t[:, None, :]).to(history.dtype)
        for block in self.blocks:
            h = block(h, query_pad)
        # Dropout and LayerNorm act per position: only the last one is read.
        return self.norm(self.dropout(h[:, -1]))


def step_keys(keys: torch.Tensor, step: int) -> torch.Tensor:
    """The keys of reverse step `step`'s draws: the row keys xor a per-step constant (odd multiple
    of the golden ratio, below 2**62, never 0), so every step has fresh numbers and a reverse
    process may be longer than the calls one KeyedDraws allows."""
    return keys ^ (((step + 1) * 0x9E3779B97F4A7C15) % 2**62)


class DiffuRec(nn.Module):
    """forward(batch) -> (loss, {"rec"}); score(input_ids) -> [B, N+2] (module docstring)."""

    needs_views = False
    # Real positions attend to the padding keys (the public code's mask), so outputs depend on a
    # batch's padding width: its batches keep max_len (docs/method.md, "Trimmed batches").
    trims_batches = False
    # The CE implementation; build_model replaces it with one from the kernels config.
    item_ce = ItemCrossEntropy()
    training_rows = "prefixes"

    def __init__(self, cfg, num_items: int, max_len: int):
        super().__init__()
        self.num_items = num_items
        self.hidden = cfg.hidden_size
        # Row N+1 only gives the scores the engine's [B, N+2] shape; it is never an input.
        self.item_embeddings = nn.Embedding(num_items + 2, cfg.hidden_size)
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.schedule = PeerSchedule(cfg.noise_schedule, cfg.diffusion_steps)
        self.sample_timesteps = spaced_timesteps(cfg.diffusion_steps, cfg.sample_steps)
        self.reverse_schedule = RespacedSchedule(cfg.noise_schedule, cfg.diffusion_steps, self.sample_timesteps)
        self.approximator = Approximator(cfg, cfg.diffusion_steps)
        # The evaluation seed travels with the weights (a resumed run does not call prepare).
        add_eval_seed(self)

    @property
    def never_rank(self) -> tuple[int, int]:
        return (0, self.num_items + 1)

    def prepare(self, split, device, seed: int) -> None:
        """Fix the seed of the evaluation noise (no data-dependent initialisation)."""
        set_eval_seed(self, seed)

    def embed_history(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm(Dropout(emb)) [B, L, H] and the padding queries [B, 1, L, 1]."""
        history = self.emb_norm(self.emb_dropout(self.item_embeddings(input_ids)))
        return history, (input_ids == 0)[:, None, :, None]

    def _draws(self, keys: torch.Tensor | None, stream: int, rows: int, device):
        return KeyedDraws(keys, stream) if keys is not None else GeneratorDraws(None, rows, device)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        target = batch["target_pos"][:, -1]             # prefix rows: the target is in the last column
        rows, length = ids.shape
        keys, steps = batch.get("row_key"), self.schedule.steps
        with nvtx.phase("denoiser"):
            history, query_pad = self.embed_history(ids)
            x0 = self.item_embeddings(target)
            u = self._draws(keys, Streams.TIMESTEPS, rows, ids.device).uniform(())
            t = (u * steps).long().clamp_max(steps - 1)
            eps = self._draws(keys, Streams.PEER_NOISE, rows, ids.device).normal((self.hidden,))
            x_t = self.schedule.q_sample(x0, t, eps.to(x0.dtype))
            lam_noise = self._draws(keys, Streams.LAMBDA, rows, ids.device).normal((length, self.hidden))
            x0_hat = self.approximator(history, query_pad, x_t, t, lam_noise)
        with nvtx.phase("losses"):
            # Rows 0..N: the padding item is a candidate, as in the public code; N+1 is not.
            loss = self.item_ce.global_mean(x0_hat, self.item_embeddings.weight[: self.num_items + 1], target,
                                            ignore_index=0)
        return loss, {"rec": loss.detach()}

    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The reverse process's result [B, D] (fp32), scored against every embedding row.

        Start noise, step noise and lambda come from the row's contents and the run's seed (each
        step from its own keys, `step_keys`), so a user's scores do not depend on the batch. The
        history is embedded once; each step reruns the Approximator (x_t enters every position)."""
        rows, length = input_ids.shape
        keys = eval_keys(self, input_ids)
        with nvtx.phase("reverse_process"):
            history, query_pad = self.embed_history(input_ids)
            x = KeyedDraws(keys, Streams.REVERSE).normal((self.hidden,))
            for i in reversed(range(len(self.sample_timesteps))):
                tau = torch.full((rows,), self.sample_timesteps[i], dtype=torch.int64, device=input_ids.device)
                step = torch.full((rows,), i, dtype=torch.int64, device=input_ids.device)
                keys_i = step_keys(keys, i)
                lam = KeyedDraws(keys_i, Streams.LAMBDA).normal((length, self.hidden))
                x0_hat = self.approximator(history, query_pad, x, tau, lam).float()
                x = self.reverse_schedule.posterior_step(x0_hat, x, step,
                                                         KeyedDraws(keys_i, Streams.REVERSE).normal((self.hidden,)))
        # At step 0 the posterior mean is x0_hat (coefficients 1 and 0) and no noise is added:
        # x is the last x0_hat, what the public code ranks with.
        return x.float()

    def item_table(self) -> torch.Tensor:
        """Every embedding row [N+2, D] in float32 (row 0 is a candidate under eval.protocol unmasked)."""
        return self.item_embeddings.weight.float()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, N+2] (fp32) of every embedding row: user_query against item_table."""
        return inner_product_scores(self.user_query(input_ids), self.item_table())
