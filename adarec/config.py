"""Run configuration: one pydantic model per YAML section, dotted overrides, strict checking.

A run is described by defaults < YAML file < ``--set section.key=value`` overrides. Every key is
declared once, as a field of its section's model: its type and range or choices in the annotation
(``Annotated[int, Field(ge=1)]``, ``Literal[...]``), its default, and its help text in the string
literal after it (pydantic's attribute docstrings). Validation, the error messages and
``adarec train --help-config`` (``describe_keys``) are all read from those fields, through the
models' JSON schema (``key_schemas``). Rules between keys (hidden_size divisible by num_heads,
select_metric's K in eval.ks, ...) are RunConfig's model validator. Unknown keys, wrong types and
bad values end the run with a one-line ``ConfigError`` that names the file or override and says
what would be valid.
"""

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from .errors import ConfigError, DataError

LEVEL_SCHEDULES = ("authors", "span")
"""Values of model.level_schedule (adarec/diffusion.py level_tables)."""
ABLATIONS = ("adc", "hda", "hpmoe", "router", "cont")
"""Values of model.ablate: the components of the paper's Table 4 (docs/method.md, "Ablations")."""
MODEL_NAMES: tuple[str, ...] = ("sasrec", "elcrec", "adarec", "adarec-dual", "diffurec", "adrec", "diffuasr")
"""Valid values of model.name; the model registry extends this tuple when it adds models (it is read
when a config is validated, not frozen into the field's type)."""
SELECT_METRICS = ("HR", "NDCG", "MRR")
"""The metric families eval.select_metric may name (as FAMILY@K, any case; stored upper case)."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding configs/ and data/ in a source checkout (fallback for relative paths)."""
EVAL_ITEM_CHUNK = 65536
"""Default of eval.item_chunk (also the default of the ranking functions that take a chunk)."""
CE_ITEM_CHUNK = 32768
"""Default of kernels.ce_item_chunk (also the default of the CE implementations that take one)."""


# ----------------------------------------------------------------------------- field types

# Strict scalars: no "5" -> 5, 5.0 -> 5 or true -> 1; an int is accepted (as a float) for a float.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
PosInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Dropout = Annotated[Float, Field(ge=0, lt=1)]
Ratio = Annotated[Float, Field(ge=0, le=1)]

_RULE_ERROR = "config_rule"  # our validators' error type: ctx["rule"] is the message after the key


def _rule(text: str) -> dict[str, str]:
    """json_schema_extra of a field whose error should read ``key <text>`` rather than the wording
    generated from its bounds (a rule that involves another key, or one with a reason)."""
    return {"rule": text}


class _OneOf:
    """A str field whose allowed values are read when it is validated (``options()``), so that a
    tuple extended at import time (MODEL_NAMES) is honoured; the JSON schema lists them as enum."""

    def __init__(self, options: Callable[[], Sequence[str]]):
        self.options = options

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: str) -> str:
            options = self.options()
            if value not in options:
                raise PydanticCustomError(_RULE_ERROR, "{rule}", {"rule": f"must be one of {', '.join(options)}"})
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {**handler(schema), "enum": list(self.options())}


class _Distinct:
    """A list without repeated values (JSON schema uniqueItems); ``rule`` is the error text (None:
    the field's rule)."""

    def __init__(self, rule: str | None = None):
        self.rule = rule

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: list) -> list:
            if len(set(value)) != len(value):
                raise PydanticCustomError(_RULE_ERROR, "{rule}", {"rule": self.rule} if self.rule else {})
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {**handler(schema), "uniqueItems": True}


_METRIC = re.compile(rf"^({'|'.join(SELECT_METRICS)})@([0-9]+)$", re.IGNORECASE)


def _canonical_metric(value: str) -> str:
    """HR@K, NDCG@K or MRR@K in any case, returned as the metrics' key (upper case)."""
    match = _METRIC.match(value)
    if match is None:
        raise PydanticCustomError(_RULE_ERROR, "{rule}", {})
    return f"{match.group(1).upper()}@{int(match.group(2))}"       # HR@010 is the HR@10 key


class _Section(BaseModel):
    """Base of every section: unknown keys refused, every assignment validated like a loaded value."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:  # cfg.train.epochs = 0: the same one line as a bad --set
            raise _config_error(exc, {}, "config", {}, _section_name(type(self))) from None


class DataConfig(_Section):
    path: Annotated[Str, Field(min_length=1)] = "data/Beauty.txt"
    """Interaction file, one line per user: 'user item item ...' in time order. A relative path
    is looked up in the current directory first, then in the repository root."""
    max_len: PosInt = 50
    """Maximum sequence length fed to the model (older items are cut, short ones left-padded)."""
    shorten_seq_to: Annotated[Int | None, Field(ge=1)] = None
    """Sparse setting: keep only the last k history items of every user in every split; the
    max length becomes k + 3. null keeps full histories."""
    max_users: Annotated[Int | None, Field(ge=1)] = None
    """Keep only the first N users of the file (quick runs and tests). null keeps all."""
    augmented_prefix: NonNegInt = 0
    """The file was written by `adarec augment` with this many generated items before each user's
    real items (DiffuASR): targets that are generated items are left out of the training loss and
    the generated items are not history at evaluation. 0: a plain interaction file."""
    group_by_length: Bool = True
    """Training batches of similar lengths: each epoch's shuffled rows are cut into groups of
    data.group_batches batches, each group sorted by length and cut into batches, served in a
    random order (docs/method.md, "Trimmed batches"). false: plain shuffled batches."""
    group_batches: PosInt = 8
    """Batches per length group (data.group_by_length): larger groups give more uniform lengths
    per batch (less padding), smaller ones more random batch compositions. 8: 52% padding on
    Beauty and SASRec's test NDCG@20 within 3% of random batches; 50: 31% padding, 4% below
    (RESULTS.md, "Trimmed batches")."""
    min_user_items: NonNegInt = 0
    """Filter before the split: drop users with fewer than this many interactions (RecBole's
    user_inter_num_interval lower bound). Applied together with data.min_item_users until
    nothing changes (a k-core, as RecBole filters); the log counts what was dropped. 0: keep all
    (a user with fewer than 3 items is then an error: leave-one-out needs 3)."""
    min_item_users: NonNegInt = 0
    """Filter before the split: drop items with fewer than this many interactions (RecBole's
    item_inter_num_interval lower bound), with data.min_user_items until nothing changes. 0: keep
    all items."""
    width_buckets: list[PosInt] | None = Field(default_factory=lambda: [4, 8, 16, 32],
                                               json_schema_extra=_rule("must be a list of widths >= 1 or null"))
    """Every batch (training and evaluation) is trimmed to its longest row rounded up to one of
    these widths (max_len is always one); padding columns are cut, no item. null: batches keep
    max_len. Models whose reference code reads padding (diffurec, adrec) are never trimmed."""


class ModelConfig(_Section):
    name: Annotated[Str, _OneOf(lambda: MODEL_NAMES)] = "sasrec"
    """Model to train: sasrec, elcrec, adarec (the paper model), adarec-dual (the authors' code), or a
    peer: diffurec, adrec, diffuasr (its pseudo-prefix generator; docs/peers.md)."""
    hidden_size: PosInt = 64
    """Embedding and Transformer hidden size D; must be divisible by num_heads."""
    num_layers: PosInt = 2
    """Number of post-LN Transformer blocks in the encoder."""
    num_heads: PosInt = 2
    """Attention heads per Transformer block."""
    hidden_dropout: Dropout = 0.5
    """Dropout on embeddings and Transformer hidden states, in [0, 1)."""
    attn_dropout: Dropout = 0.5
    """Dropout on attention probabilities, in [0, 1)."""
    initializer_range: PosFloat = 0.02
    """Standard deviation of the normal init of Linear and Embedding weights."""
    rec_loss: Literal["bce", "ce"] = "bce"
    """Next-item loss: bce (one sampled negative per position, the authors' code) or ce
    (full-softmax cross-entropy over all items, as the paper writes)."""
    cf_weight: NonNegFloat = 0.1
    """ELCRec: weight of the instance contrastive loss between two augmented views."""
    intent_cf_weight: NonNegFloat = 0.1
    """ELCRec: weight of the intent contrastive loss between views and their intent centers."""
    num_intent_clusters: PosInt = 256
    """ELCRec: number K of learnable intent centers (256 Beauty/Yelp, 512 Sports/Toys)."""
    trade_off: NonNegFloat = 1.0
    """ELCRec: weight of the cluster term (sample-center minus center-center distance)."""
    kmeans_init: Bool = True
    """ELCRec: initialise the intent centres by k-means on the untrained model's outputs; false
    reproduces the authors' ADARec code, which never initialises them (a compat quirk)."""
    prototype: Literal["none", "shift", "concat"] = "none"
    """ELCRec: how intent centres enter the instance contrast: none, shift (add each position's
    nearest centre to its output; the reference setting for Beauty) or concat (append it; Sports,
    Toys, Yelp)."""
    cl_temperature: PosFloat = 1.0
    """ELCRec: temperature of the NT-Xent contrastive losses."""
    max_depth: NonNegInt = 8
    """ADARec: maximum augmentation depth T_max (paper grid 4, 6, 8, 10, 12); depths 0..T_max."""
    diffusion_steps: PosInt = 50
    """ADARec: length of the linear beta schedule (1e-4 to 0.02) the levels are taken from."""
    gumbel_tau: PosFloat = 0.5
    """ADARec: Gumbel-softmax temperature of the depth controller."""
    denoiser_mult: PosInt = 4
    """ADARec: hidden width of the MLP denoiser as a multiple of hidden_size."""
    lambda_deno: NonNegFloat = 0.1
    """ADARec: weight of the denoising loss L_deno (paper grid 0.01-0.15, best 0.1)."""
    lambda_cont: NonNegFloat = 0.1
    """ADARec: weight of the coarse-expert contrastive loss L_cont (paper grid 0.01-0.15)."""
    lambda_expl: NonNegFloat = 0.01
    """ADARec: weight of the exploration loss L_expl = -entropy (paper grid 0.001-0.1, best 0.01)."""
    cont_temperature: PosFloat = 0.07
    """ADARec: temperature of L_cont (cosine similarity InfoNCE)."""
    depth_gradient: Literal["probe", "all", "none"] = "probe"
    """ADARec: how the depth controller learns to go deeper (docs/method.md 2.1). probe: also compute
    level T_u + 1 with forward weight 0 and a straight-through mask, so the loss says what one more
    level would do (one extra level per user); all: every level up to T_max (ablation); none: only
    levels <= T_u, which gives no gradient towards deeper levels. (The grid layout computes every
    level in all three modes; the mode decides which carry a gradient.)"""
    level_layout: Literal["auto", "grid", "compact"] = "auto"
    """ADARec: which (user, level) pairs a batch computes (docs/method.md 2, "Packed layout").
    grid: every level 0..T_max of every user, shapes fixed by B and T_max (no host sync, CUDA
    graphs); compact: only the levels the depths call for (fewer rows, but their number is read on
    the host); auto: grid on CUDA, compact on the CPU, where a host read costs nothing."""
    eval_noise: Literal["zero", "fixed", "clean"] = "zero"
    """ADARec: the trajectory at evaluation (docs/method.md 2.2). zero: eps = 0, each level
    reconstructs from sqrt(abar_k) E^0; fixed: one fixed-seed Gaussian draw per (level, position,
    channel), shared by all users; clean: every level's view is E^0 itself (no denoiser)."""
    level_schedule: Literal[LEVEL_SCHEDULES] = "authors"
    """ADARec: how corrupted each level is (docs/method.md 2.2). authors: level k is step k of the
    model.diffusion_steps-step linear beta schedule (1e-4 to 0.02), as the authors' code (noise std
    0.01 to 0.11 at T_max 8, every level close to E^0); span: abar falls linearly from 1 at level 0
    to model.final_signal**2 at T_max, from lightly to heavily corrupted."""
    final_signal: Annotated[Float, Field(gt=0, lt=1)] = 0.2
    """ADARec, model.level_schedule span: sqrt(abar) of level T_max, the share of the signal's scale
    the deepest level keeps, in (0, 1)."""
    elcrec_pooling: Literal["items", "reference"] = "items"
    """ADARec: the sequence representation its ELCRec cluster and intent terms read. items: the mean
    of h over the item positions. reference: the mean over all max_len positions of the h a
    full-width batch gives with the reference's padding attention, padding positions included (what
    the model computed before batches were trimmed). On Beauty, items reached validation NDCG@20
    .0065 after one epoch against .0016 (docs/method.md 2.5). elcrec and adarec-dual always pool as
    the reference does."""
    ablate: Annotated[list[Literal[ABLATIONS]], _Distinct()] = Field(
        default_factory=list, json_schema_extra=_rule(f"must list distinct components among {', '.join(ABLATIONS)}"))
    """ADARec: components of the paper's Table 4 to remove (docs/method.md, "Ablations"): adc (a
    fixed depth, model.fixed_depth), hda (no noise, no denoiser: every level is E^0), hpmoe (the
    fine expert's mean over the active levels replaces experts, router and gate), router (a gate per
    level that reads no content), cont (no L_cont)."""
    fixed_depth: Annotated[Int | None, Field(ge=0)] = Field(
        None, json_schema_extra=_rule("must be in [0, model.max_depth] or null"))
    """ADARec with model.ablate [adc]: the depth of every user and prefix, in [0, model.max_depth]
    (null: model.max_depth)."""
    crop_ratio: Annotated[Float, Field(gt=0, le=1)] = 0.2
    """ELCRec augmentation: fraction of the sequence kept by Crop, in (0, 1]."""
    mask_ratio: Ratio = 0.7
    """ELCRec augmentation: fraction of positions set to padding by Mask, in [0, 1]."""
    reorder_ratio: Ratio = 0.2
    """ELCRec augmentation: fraction of the sequence shuffled by Reorder, in [0, 1]."""
    emb_dropout: Dropout = 0.3
    """Peers (diffurec, adrec, diffuasr): dropout on the item embeddings before their LayerNorm."""
    noise_schedule: Literal["trunc_lin", "linear"] = "trunc_lin"
    """Peers: beta schedule of their diffusion over T = model.diffusion_steps steps, with s = 1000/T.
    trunc_lin (DiffuRec, ADRec): linear from 1e-4 s + 0.01 to 0.02 s + 0.01 (0.013125..0.635 at
    T = 32); linear (DDPM, DiffuASR): from 1e-4 s to 0.02 s. ADARec keeps its own linear schedule."""
    sample_steps: PosInt = Field(32, json_schema_extra=_rule("must be in [1, model.diffusion_steps]"))
    """Peers: reverse steps at inference, 1..model.diffusion_steps (DiffuRec and ADRec: ancestral
    steps, 32 in their papers; DiffuASR: DDIM steps, 5)."""
    lambda_uncertainty: NonNegFloat = 0.001
    """DiffuRec: lambda ~ N(this, this) scales x_t before it is added to every history position;
    ADRec: the fixed lambda of its denoiser input."""
    denoiser_layers: PosInt = 2
    """ADRec: causal Transformer blocks of the denoiser (model.num_layers counts the condition
    encoder's blocks)."""
    pretrain_epochs: NonNegInt = 0
    """ADRec stage 1: epochs of SASRec-style training (full CE, no position embedding) that
    pre-train the item embeddings before the run; 0 skips it."""
    freeze_epochs: NonNegInt = 0
    """ADRec stage 2: first epochs with the (pre-trained) item embeddings frozen; then joint."""
    prefix_items: PosInt = 10
    """DiffuASR: number of pseudo-items generated in front of each sequence."""
    denoiser_channels: PosInt = 8
    """DiffuASR: base channel count of the U-Net denoiser."""
    guidance_weight: NonNegFloat = 0.0
    """DiffuASR: classifier-free guidance weight w, eps = eps_c + w (eps_c - eps_u); 0 uses the
    conditional prediction only."""
    cond_drop: Dropout = 0.1
    """DiffuASR: probability that training replaces a row's guide by the learned null guide."""


# Why train.zero_stage stops at 2 (also checked on a train.ds_config overlay, engine/ds_config.py).
ZERO3_REFUSED = ("ZeRO-3 is not supported: it partitions every parameter and gathers it only inside its own "
                 "module's forward, and these models read weights outside it: the tied item embeddings score "
                 "items, ADARec hands the denoiser's and the gate's weights to the fused ops")


class TrainConfig(_Section):
    epochs: PosInt = 300
    """Maximum number of training epochs."""
    batch_size: PosInt = 256
    """Users per training batch (global, over all ranks)."""
    lr: PosFloat = 1e-3
    """Adam learning rate (constant, no schedule)."""
    weight_decay: NonNegFloat = 0.0
    """Adam weight decay (L2), >= 0."""
    adam_betas: Annotated[list[Dropout], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999], json_schema_extra=_rule("must be two numbers in [0, 1)"))
    """Adam betas [beta1, beta2], each in [0, 1)."""
    grad_clip: NonNegFloat = Field(0.0, json_schema_extra=_rule("must be >= 0 (0 disables clipping)"))
    """Gradient clipping norm; 0 disables it. Written explicitly into the DeepSpeed config."""
    seed: Annotated[Int, Field(ge=0, lt=2**32)] = Field(42, json_schema_extra=_rule("must be in [0, 2**32)"))
    """Random seed for Python, NumPy and torch, in [0, 2**32)."""
    patience: PosInt = 40
    """Early stopping: evaluations without improvement of select_metric before stopping."""
    eval_every: PosInt = 1
    """Evaluate on the validation split every this many epochs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."""
    zero_stage: Annotated[Int, Field(ge=0, le=2)] = Field(
        0, json_schema_extra=_rule(f"must be 0, 1 or 2 ({ZERO3_REFUSED})"))
    """DeepSpeed ZeRO stage, 0 to 2 (optimizer state and gradient partitioning)."""
    num_threads: Annotated[Int | None, Field(ge=1)] = None
    """torch CPU threads (torch.set_num_threads); null leaves torch's default."""
    log_every: PosInt = 20
    """Training steps between progress-bar loss updates."""
    bf16_mode: Literal["auto", "deepspeed", "autocast"] = "auto"
    """How bf16 is run: deepspeed (bf16 weights with DeepSpeed's fp32 master copy and overflow
    checks), autocast (fp32 weights, torch.autocast bf16 around the forward, DeepSpeed in fp32 with
    fused Adam: nothing read on the host), or auto: autocast on one process at ZeRO stage 0,
    deepspeed with several ranks or ZeRO. train.cuda_graphs implies autocast."""
    cuda_graphs: Bool = False
    """Capture each member's whole training step (forward, backward, Adam) as CUDA graphs, one per
    batch shape, and replay them (engine/graphed_step.py). One GPU, ZeRO stage 0; bf16 comes from
    autocast over fp32 weights. Off until a GPU run of the device check has passed it (README)."""
    dist_timeout_s: PosFloat = Field(300.0, json_schema_extra=_rule("must be > 0 seconds"))
    """Seconds a collective (gradient all-reduce, evaluation sums) may wait for the other ranks
    before the run stops, naming the rank that is gone (engine/rank_watch.py)."""
    grad_merge: Literal["sum", "pcgrad"] = "sum"
    """How a model's losses become one gradient. sum: the gradient of their sum; pcgrad: one
    gradient per loss, projected where they conflict and merged as ADRec's public code does
    (docs/peers.md; adrec only, one backward per loss)."""
    ds_config: Str | None = None
    """Optional DeepSpeed JSON (e.g. configs/deepspeed/zero2_offload.json) merged over the config the
    engine builds, for settings the run config does not cover (ZeRO offload, comms, ...)."""


class EvalConfig(_Section):
    ks: Annotated[list[PosInt], Field(min_length=1), _Distinct("must not repeat a cut-off")] = Field(
        default_factory=lambda: [5, 10, 20])
    """Cut-offs K for HR@K, NDCG@K and MRR@K, distinct."""
    protocol: Literal["full", "compat", "unmasked"] = "full"
    """full: the user's history items excluded (-inf), padding/mask rows never ranked.
    compat: the authors' quirk, history items scored 0 and padding/mask rows kept as candidates.
    unmasked: DiffuRec's and ADRec's evaluation, history items and the padding row kept as
    candidates with their scores (the mask row, which their vocabularies lack, is not)."""
    batch_size: PosInt = 1024
    """Users per evaluation batch."""
    item_chunk: PosInt = EVAL_ITEM_CHUNK
    """Items scored at a time: evaluation holds batch_size x item_chunk scores and a running top-K,
    never a users x items matrix, so a catalog of any size ranks in bounded memory."""
    select_metric: Annotated[Str, AfterValidator(_canonical_metric)] = Field(
        "NDCG@20", json_schema_extra=_rule("must be HR@K, NDCG@K or MRR@K (any case)"))
    """Validation metric for model selection and early stopping: HR@K, NDCG@K or MRR@K with K in
    eval.ks, in any case (ndcg@20 is stored as NDCG@20)."""


class KernelsConfig(_Section):
    backend: Literal["auto", "fused", "eager"] = "auto"
    """Implementation of the fused ops (adarec/backends.py): the diffusion trajectory (Triton), the
    gated fusion (native C++/CUDA library) and the linear cross-entropy (Triton). auto: on a CPU the
    eager trajectory, the native gated fusion (eager when the library is not built) and a PyTorch
    cross-entropy (chunked above kernels.ce_item_chunk); on CUDA the eager trajectory and gated
    fusion until a GPU run of the device check has verified the GPU paths
    (backends.GPU_PATHS_VERIFIED; until then a log line says so), the fused ones after, where they
    load, and the Triton cross-entropy once backends.LINEAR_CE_GPU_VERIFIED (before: chunked above
    kernels.ce_item_chunk, full logits below). fused: every fused op, or a one-line error where one
    cannot run (Triton needs CUDA, or TRITON_INTERPRET=1 on a CPU). eager: the reference PyTorch
    functions (full-logit cross-entropy). The environment variable ADAREC_KERNELS, when set,
    overrides this value."""
    ce_item_chunk: PosInt = CE_ITEM_CHUNK
    """Items per chunk of the full-softmax cross-entropy (model.rec_loss ce and the peers' CE).
    A catalog larger than this trains without a rows x items logit matrix: the log-sum-exp is
    accumulated chunk by chunk and the chunk logits are recomputed in the backward; a catalog
    that fits one chunk uses full logits (with kernels.backend auto on a CPU, the kept-softmax
    variant, which makes fewer passes over them) (docs/catalogs.md)."""


class ProfilingConfig(_Section):
    nvtx: Bool = False
    """NVTX ranges around every phase of a step (data, controller, trajectory, experts, fusion,
    losses, backward, optimizer step, evaluation) for Nsight; free when off."""


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    """Dataset file and sequence preparation."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model architecture and loss weights."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimization, early stopping and runtime settings."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Ranking evaluation settings."""
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    """Choice between the fused kernels and their eager twins."""
    profiling: ProfilingConfig = Field(default_factory=ProfilingConfig)
    """Instrumentation for profilers."""

    @model_validator(mode="after")
    def _rules_between_keys(self, info: ValidationInfo) -> "RunConfig":
        if (info.context or {}).get("between_keys", True):
            for key, ok, rule, also in _rules_between(self):
                if not ok:
                    section, name = key.split(".")
                    value = getattr(getattr(self, section), name)
                    raise PydanticCustomError(_RULE_ERROR, "{key} {rule}", {
                        "key": key, "rule": rule, "also": ",".join(also), "value": repr(value)})
        return self


def _rules_between(cfg: RunConfig) -> Iterator[tuple[str, bool, str, tuple[str, ...]]]:
    """(key, ok, rule, other keys it depends on) for each rule that involves several keys; the
    error names where the newest of the key and the others was set."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    # The filters would count and drop the generated items of an augmented file as real ones,
    # moving real items into the generated prefix; filter before `adarec augment` instead.
    for key in ("min_user_items", "min_item_users"):
        yield (f"data.{key}", d.augmented_prefix == 0 or getattr(d, key) == 0,
               "must be 0 for an augmented file (data.augmented_prefix > 0): filter the data before "
               "`adarec augment`", ("data.augmented_prefix",))
    yield ("model.hidden_size", m.hidden_size % m.num_heads == 0,
           f"must be divisible by model.num_heads ({m.num_heads})", ("model.num_heads",))
    authors_steps = m.name == "adarec-dual" or (m.name == "adarec" and m.level_schedule == "authors")
    yield ("model.max_depth", not authors_steps or m.max_depth <= m.diffusion_steps,
           "must be in [0, model.diffusion_steps]", ("model.diffusion_steps",))
    yield ("model.fixed_depth", m.fixed_depth is None or m.fixed_depth <= m.max_depth,
           "must be in [0, model.max_depth] or null", ("model.max_depth",))
    yield ("model.sample_steps", m.sample_steps <= m.diffusion_steps,
           "must be in [1, model.diffusion_steps]", ("model.diffusion_steps",))
    yield ("train.grad_merge", t.grad_merge == "sum" or m.name == "adrec",
           "pcgrad merges ADRec's two losses; it needs model.name adrec", ("model.name",))
    yield ("train.grad_merge", not (t.grad_merge == "pcgrad" and t.cuda_graphs),
           "pcgrad runs one backward per loss, which train.cuda_graphs does not capture", ("train.cuda_graphs",))
    yield ("eval.select_metric", int(e.select_metric.partition("@")[2]) in e.ks,
           f"needs its K in eval.ks {e.ks}", ("eval.ks",))


# ----------------------------------------------------------------------------- fields as data


def _sections() -> dict[str, type[_Section]]:
    return {name: f.annotation for name, f in RunConfig.model_fields.items()}


def _section_name(cls: type) -> str | None:
    return next((name for name, c in _sections().items() if c is cls), None)


def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Map each field of section model ``cls`` to its help text (its attribute docstring)."""
    return {name: f.description or "" for name, f in cls.model_fields.items()}


def key_schemas() -> dict[str, dict[str, Any]]:
    """{'section.key': its JSON schema} for every key, from the models' fields: ``type``, bounds
    (minimum, exclusiveMaximum, ...), ``enum``, ``items``, ``minItems``, ``uniqueItems``, ``rule``
    (an error wording of its own), ``nullable``, ``default`` (always present) and ``description``.
    A nullable key's schema is its non-null branch with ``nullable: true``."""
    out = {}
    for section, cls in _sections().items():
        props = cls.model_json_schema()["properties"]
        defaults = cls()
        for name in cls.model_fields:
            schema = dict(props[name])
            branches = schema.pop("anyOf", None)
            if branches is not None:
                inner = [b for b in branches if b.get("type") != "null"]
                schema = {**inner[0], **schema, "nullable": len(inner) < len(branches)}
            schema.setdefault("nullable", False)
            schema.pop("title", None)
            schema["default"] = getattr(defaults, name)
            out[f"{section}.{name}"] = schema
    return out


_TYPES = {"integer": ("int", "an integer", "integers"), "number": ("float", "a number", "numbers"),
          "string": ("str", "a string", "strings"), "boolean": ("bool", "true or false", "booleans")}


def _type_text(schema: Mapping[str, Any], plural: bool = False) -> str:
    """'an integer', 'a list of numbers', ... (for error messages)."""
    if schema.get("type") == "array":
        return f"{'lists' if plural else 'a list'} of {_type_text(schema['items'], plural=True)}"
    return _TYPES[schema["type"]][2 if plural else 1]


def _type_name(schema: Mapping[str, Any]) -> str:
    """'int', 'list[float]', 'int|null', ... (for the help)."""
    if schema.get("type") == "array":
        name = f"list[{_type_name(schema['items'])}]"
    else:
        name = _TYPES[schema["type"]][0]
    return name + ("|null" if schema.get("nullable") else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bounds(schema: Mapping[str, Any]) -> str | None:
    """'>= 1', '> 0', '[0, 1)', '(0, 1]', ... from the schema's bounds; None without any."""
    lo = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    hi = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if lo[1] is not None and hi[1] is not None:
        return f"{lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo[1] is not None:
        return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi[1] is not None:
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return None


def _values(schema: Mapping[str, Any]) -> str:
    """The allowed values in short, for the help: 'bce|ce', '>= 1', '[0, 1)', 'non-empty, items >= 1'."""
    if "enum" in schema:
        return "|".join(str(v) for v in schema["enum"])
    if schema.get("type") == "array":
        n, most, items = schema.get("minItems", 0), schema.get("maxItems"), _values(schema["items"])
        parts = [f"{n} items" if n == most else "non-empty" if n == 1 else "", items and f"items {items}",
                 "distinct" if schema.get("uniqueItems") else ""]
        return ", ".join(p for p in parts if p)
    if schema.get("minLength") == 1:
        return "non-empty"
    if "rule" in schema:  # the key's own wording, where it is short enough for a column
        text = schema["rule"].removeprefix("must be ").removeprefix("in ").removesuffix(" or null")
        if len(text) <= 40:
            return text
    return _bounds(schema) or ""


def _rule_text(schema: Mapping[str, Any]) -> str:
    """What an out-of-range value of this key is told: 'must be >= 1', 'must be in [0, 1)', ..."""
    if "rule" in schema:
        return schema["rule"]
    if "enum" in schema:
        text = f"must be one of {', '.join(str(v) for v in schema['enum'])}"
    elif schema.get("type") == "array":
        size = "non-empty " if schema.get("minItems") == 1 else ""
        items = _bounds(schema["items"])
        text = f"must be a {size}list of {_type_text(schema['items'], plural=True)}" + (f" {items}" if items else "")
    elif schema.get("minLength") == 1:
        return "must not be empty"
    else:
        bounds = _bounds(schema) or _type_text(schema)
        text = f"must be {'in ' if bounds[0] in '[(' else ''}{bounds}"
    return text + (" or null" if schema.get("nullable") else "")


# ----------------------------------------------------------------------------- pydantic errors

# Error types that say the value has the wrong type (the rest say it is out of range or not allowed).
_TYPE_ERRORS = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "finite_number",
                "string_type", "bool_type", "bool_parsing", "list_type", "model_type", "model_attributes_type"}


def _config_error(exc: ValidationError, data: Mapping, where: str, sources: Mapping[str, str],
                  section: str | None = None) -> ConfigError:
    """The first error of ``exc`` as one line: ``<origin>: <section.key> <rule>, got <value>``, the origin
    being the file or override that set the key last (``sources``), else ``where``."""
    err = exc.errors(include_url=False)[0]
    loc = ((section,) if section else ()) + tuple(err["loc"])
    ctx = err.get("ctx") or {}
    if "key" in ctx:  # a rule between keys (RunConfig._rules_between_keys)
        keys = (ctx["key"], *filter(None, ctx["also"].split(",")))
        origin = ([sources[k] for k in sources if k in keys] or [where])[-1]
        return ConfigError(f"{origin}: {ctx['key']} {ctx['rule']}, got {ctx['value']}")
    key = ".".join(map(str, loc[:2]))
    schemas = key_schemas()
    if key not in schemas:  # not a key's value (cfg.model = 5): pydantic's own words, on one line
        return ConfigError(f"{where}: {'.'.join(map(str, loc)) or 'config'}: {err['msg']}, got {err['input']!r}")
    origin = sources.get(key, where)
    schema = schemas[key]
    index = loc[2:]
    value = err["input"]
    if err["type"] in _TYPE_ERRORS or (err["type"] == "literal_error" and not isinstance(value, str)):
        wanted = _type_text(schema["items"] if index else schema)
        if schema["nullable"] and not index:
            wanted += " or null"
        at = "".join(f"[{i}]" for i in index)
        return ConfigError(f"{origin}: {key}{at} must be {wanted}, got {value!r} ({type(value).__name__})")
    rule = ctx.get("rule") or _rule_text(schema)
    whole = data.get(loc[0], {}).get(loc[1], value) if isinstance(data.get(loc[0]), Mapping) else value
    return ConfigError(f"{origin}: {key} {rule}, got {(whole if index else value)!r}")


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a string _Loader would read as a float ('1e-3'), so saved configs read back."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _read_yaml(path: Path) -> object:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None


# ----------------------------------------------------------------------------- layering
# A config is built as a plain {section: {key: value}} dict, one layer after the other (defaults,
# file, overrides), with ``sources`` recording which layer set each key last; pydantic then
# validates it once, and its first error becomes one ConfigError naming that layer.


def _section_cls(section: str, where: str) -> type[_Section]:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r}; valid sections: {', '.join(sections)}")
    return sections[section]


def _set(data: dict, section: str, key: str, value: object, where: str, sources: dict[str, str]) -> None:
    keys = _section_cls(section, where).model_fields
    if key not in keys:
        raise ConfigError(f"{where}: unknown key '{section}.{key}'; valid keys in {section!r}: {', '.join(keys)}")
    body = data.setdefault(section, {})
    body[key] = value
    dotted = f"{section}.{key}"
    sources.pop(dotted, None)  # keep insertion order = order of setting, newest last
    sources[dotted] = where


def _merge(data: dict, layer: object, where: str, sources: dict[str, str]) -> dict:
    if layer is None:
        return data
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping of sections "
                          f"({', '.join(_sections())}), got {type(layer).__name__}")
    for section, body in layer.items():
        _section_cls(str(section), where)
        if body is None:  # "train:" with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, "
                              f"got {body!r} ({type(body).__name__})")
        for key, value in body.items():
            _set(data, str(section), str(key), value, where, sources)
    return data


def _apply(data: dict, overrides: Sequence[str], prefix: str, sources: dict[str, str]) -> dict:
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        where = f"{prefix} {item}"
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep:
            raise ConfigError(f"{where}: an override must look like section.key=value (no '=' found)")
        section, dot, key = dotted.partition(".")
        if not dot or not section or not key or "." in key:
            raise ConfigError(f"{where}: the key must be section.key (one dot), got {dotted!r}; "
                              f"sections: {', '.join(_sections())}")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: cannot parse value {text!r}: {problem}") from None
        _set(data, section, key, value, where, sources)
    return data


def _build(data: dict, where: str, sources: Mapping[str, str], between_keys: bool = True) -> RunConfig:
    try:
        return RunConfig.model_validate(data, context={"between_keys": between_keys})
    except ValidationError as exc:
        raise _config_error(exc, data, where, sources) from None


# ----------------------------------------------------------------------------- public API


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Check every value of ``cfg``; raise ConfigError naming ``where`` on the first problem."""
    _build(config_to_dict(cfg), where, {})
    return cfg


def config_from_dict(d: object, where: str = "config", *, check: bool = True) -> RunConfig:
    """Build a RunConfig from a {section: {key: value}} mapping merged onto the defaults. Types and
    each key's own range are always checked; ``check=False`` skips the rules between keys."""
    sources: dict[str, str] = {}
    return _build(_merge({}, d, where, sources), where, sources, between_keys=check)


def apply_overrides(cfg: RunConfig, overrides: Sequence[str], where: str = "--set") -> RunConfig:
    """Return a validated copy of ``cfg`` with ``section.key=value`` overrides applied."""
    sources: dict[str, str] = {}
    return _build(_apply(config_to_dict(cfg), overrides, where, sources), "config", sources)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (None: defaults only), then the overrides."""
    where = str(path) if path is not None else "config"
    sources: dict[str, str] = {}
    data = _merge({}, _read_yaml(Path(path)) if path is not None else None, where, sources)
    return _build(_apply(data, overrides, "--set", sources), where, sources)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain {section: {key: value}} dict of ``cfg`` (YAML/JSON serializable)."""
    return cfg.model_dump()


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# adarec run config (defaults + config file + overrides, resolved)\n"
    text += yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_data_path(cfg: RunConfig | DataConfig) -> Path:
    """data.path as an existing file: as given, else relative to the current directory, else
    relative to the repository root (so the shipped data/ works from any directory)."""
    data = cfg.data if isinstance(cfg, RunConfig) else cfg
    path = Path(data.path).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"data.path {data.path!r}: file not found (looked at "
                    f"{', '.join(str(c) for c in candidates)})")


def describe_keys() -> str:
    """The table of ``adarec train --help-config``, one row per key, read from the models' fields:
    ``section.key  type  default  values (choices or range)  description``."""
    rows = [("key", "type", "default", "values", "description")]
    for key, schema in key_schemas().items():
        rows.append((key, _type_name(schema), json.dumps(schema["default"]), _values(schema) or "-",
                     " ".join(schema.get("description", "").split())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows)
