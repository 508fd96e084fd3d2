"""ADARec as the paper describes it (docs/method.md section 2), reference (eager) path.

E^0 from the ELCRec backbone -> Adaptive Depth Controller (a depth per user and prefix; the last
position's is the sequence's T_u) -> packed (user, level) pairs (on a GPU the whole static grid of
levels 0..T_max; the per-position depth masks decide what each weighs) -> Hierarchical Diffusion
Augmentation (one-shot reconstruction at every computed level) -> HP-MoE: the backbone
Transformer as fine expert on the packed batch, an MLP coarse expert and a content-aware router
on the *prefix* pools of each level, the gated fusion per position with per-position depth
masks -> h [B, L, D], scored against the item embeddings.
Loss: L_rec + lambda_deno L_deno + lambda_cont L_cont + lambda_expl L_expl + the ELCRec terms
(computed on h).

Causality (docs/method.md, "Causality"): L_rec trains every position, so everything that feeds
position i reads only positions <= i. The fine expert is the causal Transformer; the pools that
feed the coarse expert, the router and the final gate are prefix means; the depth at i is the
controller's choice for the prefix ending at i; the fusion is per position.

The trajectory (`adarec.diffusion.diffusion_trajectory` or its Triton twin) and the fusion
(`adarec.fusion.gated_fusion` or its C++/CUDA twin `adarec.ops.gated_fusion`) are chosen by
`kernels.backend` (adarec/backends.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from adarec.backends import fusion_function, trajectory_function
from adarec.diffusion import Denoiser, PackedLevels, grid_levels, level_tables, pack_levels
from adarec.fusion import EPS, mean_over_levels
from adarec.keyed_random import KeyedDraws, Streams
from adarec.parallel import gather_rows, global_mean, world_size
from adarec.profiling import nvtx

from .controller import DepthController, fixed_decision
from .elcrec import ELCRec, left_padded
from .encoder import masked_mean, prefix_mean
from .hierarchy_diagnostics import DIAGNOSTIC_USERS, hierarchy_diagnostics
from .losses import per_target_scaled

# The fixed evaluation noise (model.eval_noise=fixed) is one draw from this seed, independent of
# the run's seed so that every checkpoint of every run is scored against the same draw.
FIXED_NOISE_SEED = 20240601


def coarse_contrastive_loss(z: torch.Tensor, packed: PackedLevels, depths: torch.Tensor,
                            max_depth: int, temperature: float, active: torch.Tensor | None = None) -> torch.Tensor:
    """L_cont: InfoNCE with cosine similarity over the coarse outputs z [P, D] (last position).

    For user u and each k in [floor(T_u / 2), T_u - 1]: anchor z_{u,k}, positive z_{u,k+1},
    negatives z_{v,k+1} of the other users whose depth reaches k + 1. Averaged over anchors.
    Only pairs active at the last position (`active`, level <= T_u) take part.
    All levels are handled at once on a dense [T_max + 1, B, D] grid of the packed rows.
    """
    batch = depths.numel()
    if max_depth == 0:
        return z.sum() * 0.0
    active_pairs = packed.pair_active if active is None else active
    unit = F.normalize(z.float(), dim=-1) * active_pairs[:, None]
    levels = max_depth + 1
    if packed.num_pairs == batch * levels:
        # Every user owns all levels 0..T_max in order (grid_levels, or a pack in which every user
        # is that deep): the [T_max + 1, B] grid is a transposed view, no scatter needed.
        grid = unit.view(batch, levels, -1).transpose(0, 1)
        active = active_pairs.view(batch, levels).t()
    else:
        grid = unit.new_zeros(levels, batch, unit.shape[-1]).index_put((packed.pair_level, packed.pair_user), unit)
        active = torch.zeros(levels, batch, dtype=torch.bool, device=z.device).index_put(
            (packed.pair_level, packed.pair_user), active_pairs)
    level, targets = _anchor_constants(max_depth, batch, z.device)
    is_anchor = (level >= depths[None] // 2) & (level <= depths[None] - 1)    # [T, B]
    if world_size() > 1:
        return _global_contrastive(grid, is_anchor, depths, temperature)
    logits = torch.bmm(grid[:-1], grid[1:].transpose(1, 2)) / temperature      # [T, B(anchor), B(cand)]
    # Candidates below the anchor's level + 1 are out (-inf); rows that are not anchors may have no
    # candidate at all, so theirs get 0 instead: finite logits, and no weight below.
    out = torch.where(is_anchor[..., None], float("-inf"), 0.0)
    logits = torch.where(active[1:, None, :], logits, out)
    per_anchor = F.cross_entropy(logits.reshape(-1, batch), targets, reduction="none").view(max_depth, batch)
    weight = is_anchor.float()
    return (per_anchor * weight).sum() / weight.sum().clamp_min(1.0)


def _global_contrastive(grid: torch.Tensor, is_anchor: torch.Tensor, depths: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """L_cont with data-parallel ranks: this rank's anchors against the candidates of every
    rank's users (adarec/parallel.py), as this rank's share of the global mean over anchors.

    The candidates' activity at the last position is level <= T_v, rebuilt from the gathered
    depths; so is the global anchor count (sum over users of T - floor(T / 2)): no other
    collective is needed."""
    levels, batch = grid.shape[:2]
    cand, first = gather_rows(grid.transpose(0, 1).contiguous())              # [M, levels, D]
    cand = cand.transpose(0, 1)                                                 # [levels, M, D]
    all_depths, _ = gather_rows(depths)
    level_ids = torch.arange(levels, device=grid.device)[:, None]
    active = level_ids <= all_depths[None]                                      # [levels, M]
    logits = torch.bmm(grid[:-1], cand[1:].transpose(1, 2)) / temperature      # [T, B, M]
    out = torch.where(is_anchor[..., None], float("-inf"), 0.0)
    logits = torch.where(active[1:, None, :], logits, out)
    targets = (first + torch.arange(batch, device=grid.device)).repeat(levels - 1)
    per_anchor = F.cross_entropy(logits.reshape(-1, cand.shape[1]), targets, reduction="none")
    total = (per_anchor.view(levels - 1, batch) * is_anchor.float()).sum()
    anchors = (all_depths - all_depths // 2).sum().float()
    return total * world_size() / anchors.clamp_min(1.0)


# Unbounded: one entry per shape, and a captured CUDA graph may hold pointers into them.
@functools.cache
def _anchor_constants(max_depth: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L_cont's anchor levels [T, 1] and its targets (each anchor's own user) [T B]: they depend on
    the shapes only, so they are built once, not every step."""
    return (torch.arange(max_depth, device=device)[:, None],
            torch.arange(batch, device=device).repeat(max_depth))


class ADARec(ELCRec):
    needs_views = True

    def __init__(self, cfg, num_items: int, max_len: int, kernel_backend: str = "auto"):
        super().__init__(cfg, num_items, max_len)
        self.kernel_backend = kernel_backend
        # The ELCRec terms' representation (docs/method.md 2.5): the item-position mean of h, or the
        # reference's full-width mean (reference_mean).
        self.elcrec_pooling = cfg.elcrec_pooling
        hidden, depth = cfg.hidden_size, cfg.max_depth
        self.max_depth = depth
        self.depth_gradient = cfg.depth_gradient
        self.level_layout = cfg.level_layout
        self.eval_noise = cfg.eval_noise
        self.lambda_deno, self.lambda_cont, self.lambda_expl = cfg.lambda_deno, cfg.lambda_cont, cfg.lambda_expl
        self.cont_temperature = cfg.cont_temperature
        # The paper's Table 4 ablations (docs/method.md, "Ablations"): what is removed is not built.
        self.ablate = frozenset(cfg.ablate)
        self.fixed_depth = depth if cfg.fixed_depth is None else cfg.fixed_depth
        self.controller = None if "adc" in self.ablate else DepthController(hidden, max_len, depth, cfg.gumbel_tau)
        self.denoiser = None if "hda" in self.ablate else Denoiser(hidden, cfg.denoiser_mult * hidden, depth)
        sqrt_abar, sqrt_one_minus = level_tables(depth, cfg.diffusion_steps, cfg.level_schedule, cfg.final_signal)
        self.register_buffer("sqrt_abar", sqrt_abar, persistent=False)
        self.register_buffer("sqrt_one_minus_abar", sqrt_one_minus, persistent=False)
        fixed = torch.randn(depth + 1, max_len, hidden, generator=torch.Generator().manual_seed(FIXED_NOISE_SEED))
        self.register_buffer("fixed_noise", fixed, persistent=False)
        # The Philox seed of the keyed in-kernel noise (the row keys carry the run's seed), kept on
        # the device: a tensor made from a host int in every step could not be graph-captured.
        self.register_buffer("diffusion_seed", torch.tensor([Streams.DIFFUSION], dtype=torch.int64), persistent=False)
        self.coarse = self.level_embedding = self.router = self.final_gate = None
        if "hpmoe" not in self.ablate:
            self.coarse = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            self.level_embedding = nn.Embedding(depth + 1, hidden)
            # Without the content-aware router the gate reads the level embedding only.
            router_in = hidden if "router" in self.ablate else 2 * hidden
            self.router = nn.Sequential(nn.Linear(router_in, hidden), nn.GELU(), nn.Linear(hidden, 1))
            self.final_gate = nn.Linear(hidden, hidden)
        for module in (self.controller, self.denoiser, self.coarse, self.level_embedding, self.router,
                       self.final_gate):
            if module is not None:
                module.apply(self.encoder._init_weights)
        self._stats: dict[str, torch.Tensor] | None = None

    # -- the forward path shared by training and scoring ---------------------------------------
    def user_representation(self, input_ids: torch.Tensor, last_only: bool = False,
                            row_keys: torch.Tensor | None = None) -> dict:
        """h [B, L, D] and the intermediate outputs. `last_only` (evaluation) builds only the levels
        the last position uses, so h is exact there and only there. `row_keys` (training batches
        carry them) key the Gumbel and diffusion noise by row (adarec/keyed_random.py); without
        them the noise comes from torch's RNG."""
        e0 = self.encoder.embed(input_ids)
        with nvtx.phase("controller"):
            if self.controller is None:
                decision = fixed_decision(input_ids, self.fixed_depth, self.max_depth)
            else:
                gumbel = KeyedDraws(row_keys, Streams.GUMBEL) if row_keys is not None else None
                decision = self.controller(e0, input_ids, gumbel)
            packed = self._pack(decision, last_only)
        with nvtx.phase("trajectory"):
            e_hat, l_deno = self._trajectory(e0, input_ids, packed, row_keys)
        with nvtx.phase("experts"):
            pair_ids = input_ids[packed.pair_user]
            fine = self.encoder.encode(e_hat, pair_ids)                 # [P, L, D], causal attention
            mode = self.depth_gradient if self.training else "none"
            m = decision.pair_masks(packed.pair_user, packed.pair_level, mode).to(fine.dtype)  # [P, L]
            if self.coarse is None:
                # Without HP-MoE: the fine expert's mean over each position's active levels.
                h = mean_over_levels(fine, m, packed.pair_user, input_ids.shape[0])
                return {"h": h, "z_coar": None, "coarse": None, "g": None, "packed": packed,
                        "decision": decision, "l_deno": l_deno, "e_hat": e_hat, "e0": e0}
            pooled = prefix_mean(e_hat, pair_ids)                       # [P, L, D], positions <= i
            coarse = self.coarse(pooled)
            g = self._route(pooled, packed.pair_level)                  # [P, L]
        with nvtx.phase("fusion"):
            fusion = fusion_function(self.kernel_backend, fine.device)
            h, z_coar = fusion(fine, coarse, g, m, packed.offsets, self.final_gate.weight, self.final_gate.bias)
        return {"h": h, "z_coar": z_coar, "coarse": coarse, "g": g, "packed": packed,
                "decision": decision, "l_deno": l_deno, "e_hat": e_hat, "e0": e0}

    def initial_representation(self, ids: torch.Tensor) -> torch.Tensor:
        """What the intent centres' k-means clusters: the representation training's ELCRec terms
        start from, the untrained backbone's item-position mean under model.elcrec_pooling=items,
        its full-width reference mean under reference."""
        if self.elcrec_pooling == "reference":
            return super().initial_representation(ids)
        return masked_mean(self.encoder(ids), ids)

    def reference_mean(self, out: dict, input_ids: torch.Tensor) -> torch.Tensor:
        """The ELCRec terms' representation [B, D] under model.elcrec_pooling=reference: the mean of
        h over all max_len positions as a full-width batch computes it with the reference's padding attention (a
        padding query attends to every key), whatever the width of `input_ids` (docs/method.md
        2.5 and "Trimmed batches").

        A padding position has depth 0, so only level 0 weighs there: its fine output is the
        level-0 Transformer output at that position, its pool is 0 (no item at or before it),
        hence its coarse output, router weight and gate are constants of the model. The padding
        outputs therefore come from one full-width pass of E^0 (zero on the padding, as the
        trajectory's level 0 is) and the item positions from h. Most positions of a Beauty row are
        padding, so the constant part, (1 - gate) times the coarse expert's output at a zero pool,
        weighs heavily in it; measured on Beauty, L_cont fell to 0.4 in the first epoch (4.9 with
        the item mean) and validation NDCG@20 was .0016 (.0065): docs/method.md 2.5."""
        length = self.encoder.max_len
        items = (input_ids > 0).unsqueeze(-1)
        item_sum = (out["h"].float() * items).sum(1)                                   # [B, D]
        full_ids = left_padded(input_ids, length)
        level0 = out["e0"].new_zeros((input_ids.shape[0], length, out["e0"].shape[-1]))
        level0[:, length - input_ids.shape[1]:] = out["e0"] * items.to(out["e0"].dtype)
        fine = self.encoder.encode(level0, full_ids, reference_padding=True)           # [B, L, D]
        padding = (full_ids == 0).unsqueeze(-1)
        fine_sum = (fine.float() * padding).sum(1)                                     # [B, D]
        if self.coarse is None:
            # mean_over_levels with level 0 alone: h is the fine output.
            return (item_sum + fine_sum) / length
        zero = out["e0"].new_zeros((1, 1, out["e0"].shape[-1]))
        coarse = self.coarse(zero).float()                                             # [1, 1, D]
        g = self._route(zero, torch.zeros(1, dtype=torch.long, device=zero.device)).float()[..., None]
        # gated_fusion at one active level: z = w x / (w + EPS) for each expert.
        z_fin_scale = g / (g + EPS)
        z_coar = (1.0 - g) * coarse / ((1.0 - g) + EPS)
        gate = torch.sigmoid(F.linear(z_coar, self.final_gate.weight.float(), self.final_gate.bias.float()))
        pad_sum = (gate * z_fin_scale)[:, 0] * fine_sum + padding.sum(1) * ((1.0 - gate) * z_coar)[:, 0]
        return (item_sum + pad_sum) / length

    def _pack(self, decision, last_only: bool) -> PackedLevels:
        """The (user, level) pairs to compute (docs/method.md 2, "Packed layout"). Active (entering
        L_deno) are the levels some position's depth reaches, or for scoring, which reads the last
        position only, that position's levels 0..T_u. The grid computes every level; the compact
        layout only the active ones, plus in training the depth-gradient mode's extra levels.
        Which levels weigh in the fusion and which pass the controller a gradient is the
        per-position depth mask's business either way."""
        depths = decision.sequence_depths if last_only else decision.top_depths()
        grid = self.level_layout == "grid" or (self.level_layout == "auto" and depths.is_cuda)
        if grid:
            return grid_levels(depths, self.max_depth)
        return pack_levels(depths, self.max_depth, self.depth_gradient if self.training else "none")

    def _trajectory(self, e0: torch.Tensor, input_ids: torch.Tensor, packed: PackedLevels,
                    row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ehat [P, L, D] and L_deno; evaluation follows model.eval_noise (docs/method.md 2.2).
        With several data-parallel ranks L_deno is this rank's share of the global mean."""
        lengths = (input_ids > 0).sum(1)
        evaluating = not self.training
        if self.denoiser is None or (evaluating and self.eval_noise == "clean"):
            # Clean levels: without HDA in training too (docs/method.md, "Ablations").
            valid = (input_ids > 0)[packed.pair_user].unsqueeze(-1).to(e0.dtype)
            return e0[packed.pair_user] * valid, e0.sum() * 0.0
        noise = None
        if evaluating and self.eval_noise == "fixed":
            noise = self.fixed_noise[:, -e0.shape[1]:].to(e0.dtype)[packed.pair_level]
        den = self.denoiser
        trajectory = trajectory_function(self.kernel_backend, e0.device)
        # Keyed noise: the same row gets the same noise on every rank (adarec/keyed_random.py).
        keyed = {} if row_keys is None or noise is not None else {"keys": row_keys, "seed": self.diffusion_seed}
        loss_weight = packed.pair_active.to(torch.float32)
        e_hat, l_deno = trajectory(
            e0, lengths, packed.pair_user, packed.pair_level, self.sqrt_abar, self.sqrt_one_minus_abar,
            den.fc1.weight, den.fc1.bias, den.step_table(), den.fc2.weight, den.fc2.bias,
            noise=noise, zero_noise=evaluating and self.eval_noise == "zero",
            loss_weight=loss_weight, **keyed,
        )
        if self.training and world_size() > 1:
            # L_deno is a mean over (pair, position) terms, as many as the noised levels' items.
            count = (lengths[packed.pair_user] * (packed.pair_level > 0) * loss_weight).sum()
            l_deno = global_mean(l_deno * count.detach(), count)
        return e_hat, l_deno

    def _route(self, pooled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """g = sigmoid(MLP([pool_k[i] ; emb(k)])) per (pair, position): [P, L].

        The first layer is split into its pooled and level halves so the level half is computed
        once per pair instead of being concatenated at every position.
        """
        first, act, last = self.router
        if "router" in self.ablate:
            # Content-blind: one gate per level, the same at every position of every user.
            gate = torch.sigmoid(last(act(first(self.level_embedding(levels))))).squeeze(-1)     # [P]
            return gate[:, None].expand(-1, pooled.shape[1]).to(pooled.dtype)
        hidden = pooled.shape[-1]
        per_pair = F.linear(self.level_embedding(levels), first.weight[:, hidden:], first.bias)   # [P, D]
        pre = F.linear(pooled, first.weight[:, :hidden]) + per_pair[:, None, :]
        return torch.sigmoid(last(act(pre))).squeeze(-1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.user_representation(batch["input_ids"], row_keys=batch.get("row_key"))
        with nvtx.phase("losses"):
            return self._objective(out, batch)

    def _objective(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        decision, packed = out["decision"], out["packed"]
        depths = decision.sequence_depths
        # L_cont and the statistics read the last position: the whole input and its depth T_u.
        active_last = packed.pair_level <= depths[packed.pair_user]
        # An ablated component's term is absent, not zero (docs/method.md, "Ablations").
        terms = {"rec": self.rec_loss(out["h"], batch)}
        if self.denoiser is not None:
            # A mean over item positions: length-grouped batches weigh it like L_rec.
            terms["deno"] = per_target_scaled(out["l_deno"], batch)
        if out["coarse"] is not None and "cont" not in self.ablate:
            terms["cont"] = coarse_contrastive_loss(out["coarse"][:, -1], packed, depths, self.max_depth,
                                                    self.cont_temperature, active_last)
        if self.controller is not None:
            terms["expl"] = decision.exploration
        if self.elcrec_pooling == "reference":
            with nvtx.phase("reference_pool"):
                representation = self.reference_mean(out, batch["input_ids"])
        else:
            representation = masked_mean(out["h"], batch["input_ids"])
        terms.update(self.elcrec_terms(batch, representation))
        weights = {"deno": self.lambda_deno, "cont": self.lambda_cont, "expl": self.lambda_expl}
        loss = terms["rec"] + self.weighted_elcrec(terms)
        for key, weight in weights.items():
            if key in terms:
                loss = loss + weight * terms[key]
        self._record(depths, packed, active_last, out["g"])
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The fused user representation at the last position [B, D] (float32)."""
        return self.user_representation(input_ids, last_only=True)["h"][:, -1].float()

    # -- observability: accumulated on device, read once per epoch ----------------------------
    @torch.no_grad()
    def _record(self, depths: torch.Tensor, packed: PackedLevels, active_last: torch.Tensor,
                g: torch.Tensor | None) -> None:
        levels = self.max_depth + 1
        if self._stats is None:
            # Plain float64 tensors, not buffers: a bf16 engine must not cast the counters.
            zeros = torch.zeros(levels, dtype=torch.float64, device=depths.device)
            self._stats = {"depth": zeros.clone(), "router_sum": zeros.clone(), "router_n": zeros.clone(),
                           "needed": zeros.new_zeros(()), "pairs": zeros.new_zeros(()), "users": zeros.new_zeros(())}
        s = self._stats
        last = active_last.double()
        # index_add_ rather than bincount: bincount sizes its output from the data (a host sync).
        s["depth"].index_add_(0, depths, torch.ones_like(depths, dtype=torch.float64))
        # The router at the last position (the one scoring uses), on the levels active there.
        if g is not None:               # None without HP-MoE: there is no router
            s["router_sum"].index_add_(0, packed.pair_level, g[:, -1].double() * last)
        s["router_n"].index_add_(0, packed.pair_level, last)
        s["needed"] += packed.pair_active.double().sum()
        s["pairs"] += packed.num_pairs
        # On the device, like the rest: a replayed CUDA graph runs no Python (engine/graphed_step.py).
        s["users"] += depths.numel()

    def epoch_diagnostics(self, split) -> dict[str, float]:
        """Per-level L_deno, distance of each level's view from E^0 and the controller's entropy on
        the first validation users (adarec/models/hierarchy_diagnostics.py)."""
        ids = split.valid_input[:DIAGNOSTIC_USERS].to(self.encoder.item_embeddings.weight.device)
        return hierarchy_diagnostics(self, ids)

    def stat_tensors(self) -> list[torch.Tensor]:
        """The device counters behind pop_epoch_stats (empty before the first training step)."""
        return list(self._stats.values()) if self._stats is not None else []

    def _summed_over_ranks(self) -> dict[str, torch.Tensor]:
        total = {k: v.clone() for k, v in self._stats.items()}
        for value in total.values():
            torch.distributed.all_reduce(value)
        return total

    def pop_epoch_stats(self) -> dict[str, float | None]:
        """Since the last call: the histogram of the sequence depths T_u (last position), the
        mean router weight per level active at the last position, and three fractions of the
        B (T_max + 1) (user, level) pairs (docs/method.md 2, "Packed layout"): active at the last
        position (what scoring weighs), needed by some position, and computed."""
        if self._stats is None:
            return {}
        # With several ranks each counted its own rows: the epoch's statistics are their sums.
        stats = self._summed_over_ranks() if world_size() > 1 else self._stats
        s = {k: v.to("cpu", copy=True) for k, v in stats.items()}
        # Zeroed in place, not replaced: a captured training step (engine/graphed_step.py) keeps
        # adding into these very tensors.
        for value in self._stats.values():
            value.zero_()
        users = float(s["users"])
        if not users:
            return {}
        out = {f"depth_frac_{k}": float(s["depth"][k]) / users for k in range(self.max_depth + 1)}
        for k in range(self.max_depth + 1 if self.router is not None else 0):
            n = float(s["router_n"][k])
            out[f"router_g_{k}"] = float(s["router_sum"][k]) / n if n else None
        grid = users * (self.max_depth + 1)
        out["pairs_active_frac"] = float(s["router_n"].sum()) / grid
        out["pairs_needed_frac"] = float(s["needed"]) / grid
        out["pairs_computed_frac"] = float(s["pairs"]) / grid
        return out
