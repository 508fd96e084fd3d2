"""Run configuration: one dataclass per YAML section, dotted overrides, strict checking.

A run is described by defaults < YAML file < ``--set section.key=value`` overrides. Every key
is typed by its annotation and documented by the string literal on the line after it (read
back by ``field_docs``), so unknown keys, wrong types and bad values end the run with a
``ConfigError`` that names the file or override and lists what would be valid.
"""

import ast
import copy
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import tempfile
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import yaml

from .errors import ConfigError, DataError

LEVEL_SCHEDULES = ("authors", "span")
"""Values of model.level_schedule (adarec/diffusion.py level_tables)."""
ABLATIONS = ("adc", "hda", "hpmoe", "router", "cont")
"""Values of model.ablate: the components of the paper's Table 4 (docs/method.md, "Ablations")."""
MODEL_NAMES: tuple[str, ...] = ("sasrec", "elcrec", "adarec", "adarec-dual", "diffurec", "adrec", "diffuasr")
"""Valid values of model.name; the model registry extends this tuple when it adds models."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding configs/ and data/ in a source checkout (fallback for relative paths)."""


@dataclass
class DataConfig:
    path: str = "data/Beauty.txt"
    """Interaction file, one line per user: 'user item item ...' in time order. A relative path
    is looked up in the current directory first, then in the repository root."""
    max_len: int = 50
    """Maximum sequence length fed to the model (older items are cut, short ones left-padded)."""
    shorten_seq_to: int | None = None
    """Sparse setting: keep only the last k history items of every user in every split; the
    max length becomes k + 3. null keeps full histories."""
    max_users: int | None = None
    """Keep only the first N users of the file (quick runs and tests). null keeps all."""
    augmented_prefix: int = 0
    """The file was written by `adarec augment` with this many generated items before each user's
    real items (DiffuASR): targets that are generated items are left out of the training loss and
    the generated items are not history at evaluation. 0: a plain interaction file."""
    group_by_length: bool = True
    """Training batches of similar lengths: each epoch's shuffled rows are cut into groups of
    data.group_batches batches, each group sorted by length and cut into batches, served in a
    random order (docs/method.md, "Trimmed batches"). false: plain shuffled batches."""
    group_batches: int = 8
    """Batches per length group (data.group_by_length): larger groups give more uniform lengths
    per batch (less padding), smaller ones more random batch compositions. 8: 52% padding on
    Beauty and SASRec's test NDCG@20 within 3% of random batches; 50: 31% padding, 4% below
    (RESULTS.md, "Trimmed batches")."""
    width_buckets: list[int] | None = field(default_factory=lambda: [4, 8, 16, 32])
    """Every batch (training and evaluation) is trimmed to its longest row rounded up to one of
    these widths (max_len is always one); padding columns are cut, no item. null: batches keep
    max_len. Models whose reference code reads padding (diffurec, adrec) are never trimmed."""


@dataclass
class ModelConfig:
    name: str = "sasrec"
    """Model to train: sasrec, elcrec, adarec (the paper model), adarec-dual (the authors' code), or a
    peer: diffurec, adrec, diffuasr (its pseudo-prefix generator; docs/peers.md)."""
    hidden_size: int = 64
    """Embedding and Transformer hidden size D; must be divisible by num_heads."""
    num_layers: int = 2
    """Number of post-LN Transformer blocks in the encoder."""
    num_heads: int = 2
    """Attention heads per Transformer block."""
    hidden_dropout: float = 0.5
    """Dropout on embeddings and Transformer hidden states, in [0, 1)."""
    attn_dropout: float = 0.5
    """Dropout on attention probabilities, in [0, 1)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of Linear and Embedding weights."""
    rec_loss: str = "bce"
    """Next-item loss: bce (one sampled negative per position, the authors' code) or ce
    (full-softmax cross-entropy over all items, as the paper writes)."""
    cf_weight: float = 0.1
    """ELCRec: weight of the instance contrastive loss between two augmented views."""
    intent_cf_weight: float = 0.1
    """ELCRec: weight of the intent contrastive loss between views and their intent centers."""
    num_intent_clusters: int = 256
    """ELCRec: number K of learnable intent centers (256 Beauty/Yelp, 512 Sports/Toys)."""
    trade_off: float = 1.0
    """ELCRec: weight of the cluster term (sample-center minus center-center distance)."""
    kmeans_init: bool = True
    """ELCRec: initialise the intent centres by k-means on the untrained model's outputs; false
    reproduces the authors' ADARec code, which never initialises them (a compat quirk)."""
    prototype: str = "none"
    """ELCRec: how intent centres enter the instance contrast: none, shift (add each position's
    nearest centre to its output; the reference setting for Beauty) or concat (append it; Sports,
    Toys, Yelp)."""
    cl_temperature: float = 1.0
    """ELCRec: temperature of the NT-Xent contrastive losses."""
    max_depth: int = 8
    """ADARec: maximum augmentation depth T_max (paper grid 4, 6, 8, 10, 12); depths 0..T_max."""
    diffusion_steps: int = 50
    """ADARec: length of the linear beta schedule (1e-4 to 0.02) the levels are taken from."""
    gumbel_tau: float = 0.5
    """ADARec: Gumbel-softmax temperature of the depth controller."""
    denoiser_mult: int = 4
    """ADARec: hidden width of the MLP denoiser as a multiple of hidden_size."""
    lambda_deno: float = 0.1
    """ADARec: weight of the denoising loss L_deno (paper grid 0.01-0.15, best 0.1)."""
    lambda_cont: float = 0.1
    """ADARec: weight of the coarse-expert contrastive loss L_cont (paper grid 0.01-0.15)."""
    lambda_expl: float = 0.01
    """ADARec: weight of the exploration loss L_expl = -entropy (paper grid 0.001-0.1, best 0.01)."""
    cont_temperature: float = 0.07
    """ADARec: temperature of L_cont (cosine similarity InfoNCE)."""
    depth_gradient: str = "probe"
    """ADARec: how the depth controller learns to go deeper (docs/method.md 2.1). probe: also compute
    level T_u + 1 with forward weight 0 and a straight-through mask, so the loss says what one more
    level would do (one extra level per user); all: every level up to T_max (ablation); none: only
    levels <= T_u, which gives no gradient towards deeper levels. (The grid layout computes every
    level in all three modes; the mode decides which carry a gradient.)"""
    level_layout: str = "auto"
    """ADARec: which (user, level) pairs a batch computes (docs/method.md 2, "Packed layout").
    grid: every level 0..T_max of every user, shapes fixed by B and T_max (no host sync, CUDA
    graphs); compact: only the levels the depths call for (fewer rows, but their number is read on
    the host); auto: grid on CUDA, compact on the CPU, where a host read costs nothing."""
    eval_noise: str = "zero"
    """ADARec: the trajectory at evaluation (docs/method.md 2.2). zero: eps = 0, each level
    reconstructs from sqrt(abar_k) E^0; fixed: one fixed-seed Gaussian draw per (level, position,
    channel), shared by all users; clean: every level's view is E^0 itself (no denoiser)."""
    level_schedule: str = "authors"
    """ADARec: how corrupted each level is (docs/method.md 2.2). authors: level k is step k of the
    model.diffusion_steps-step linear beta schedule (1e-4 to 0.02), as the authors' code (noise std
    0.01 to 0.11 at T_max 8, every level close to E^0); span: abar falls linearly from 1 at level 0
    to model.final_signal**2 at T_max, from lightly to heavily corrupted."""
    final_signal: float = 0.2
    """ADARec, model.level_schedule span: sqrt(abar) of level T_max, the share of the signal's scale
    the deepest level keeps, in (0, 1)."""
    ablate: list[str] = field(default_factory=list)
    """ADARec: components of the paper's Table 4 to remove (docs/method.md, "Ablations"): adc (a
    fixed depth, model.fixed_depth), hda (no noise, no denoiser: every level is E^0), hpmoe (the
    fine expert's mean over the active levels replaces experts, router and gate), router (a gate per
    level that reads no content), cont (no L_cont)."""
    fixed_depth: int | None = None
    """ADARec with model.ablate [adc]: the depth of every user and prefix (null: model.max_depth)."""
    crop_ratio: float = 0.2
    """ELCRec augmentation: fraction of the sequence kept by Crop, in (0, 1]."""
    mask_ratio: float = 0.7
    """ELCRec augmentation: fraction of positions set to padding by Mask, in [0, 1]."""
    reorder_ratio: float = 0.2
    """ELCRec augmentation: fraction of the sequence shuffled by Reorder, in [0, 1]."""
    emb_dropout: float = 0.3
    """Peers (diffurec, adrec, diffuasr): dropout on the item embeddings before their LayerNorm."""
    noise_schedule: str = "trunc_lin"
    """Peers: beta schedule of their diffusion over T = model.diffusion_steps steps, with s = 1000/T.
    trunc_lin (DiffuRec, ADRec): linear from 1e-4 s + 0.01 to 0.02 s + 0.01 (0.013125..0.635 at
    T = 32); linear (DDPM, DiffuASR): from 1e-4 s to 0.02 s. ADARec keeps its own linear schedule."""
    sample_steps: int = 32
    """Peers: reverse steps at inference, 1..model.diffusion_steps (DiffuRec and ADRec: ancestral
    steps, 32 in their papers; DiffuASR: DDIM steps, 5)."""
    lambda_uncertainty: float = 0.001
    """DiffuRec: lambda ~ N(this, this) scales x_t before it is added to every history position;
    ADRec: the fixed lambda of its denoiser input."""
    denoiser_layers: int = 2
    """ADRec: causal Transformer blocks of the denoiser (model.num_layers counts the condition
    encoder's blocks)."""
    pretrain_epochs: int = 0
    """ADRec stage 1: epochs of SASRec-style training (full CE, no position embedding) that
    pre-train the item embeddings before the run; 0 skips it."""
    freeze_epochs: int = 0
    """ADRec stage 2: first epochs with the (pre-trained) item embeddings frozen; then joint."""
    prefix_items: int = 10
    """DiffuASR: number of pseudo-items generated in front of each sequence."""
    denoiser_channels: int = 8
    """DiffuASR: base channel count of the U-Net denoiser."""
    guidance_weight: float = 0.0
    """DiffuASR: classifier-free guidance weight w, eps = eps_c + w (eps_c - eps_u); 0 uses the
    conditional prediction only."""
    cond_drop: float = 0.1
    """DiffuASR: probability that training replaces a row's guide by the learned null guide."""


# Why train.zero_stage stops at 2 (also checked on a train.ds_config overlay, engine/ds_config.py).
ZERO3_REFUSED = ("ZeRO-3 is not supported: it partitions every parameter and gathers it only inside its own "
                 "module's forward, and these models read weights outside it: the tied item embeddings score "
                 "items, ADARec hands the denoiser's and the gate's weights to the fused ops")


@dataclass
class TrainConfig:
    epochs: int = 300
    """Maximum number of training epochs."""
    batch_size: int = 256
    """Users per training batch (global, over all ranks)."""
    lr: float = 1e-3
    """Adam learning rate (constant, no schedule)."""
    weight_decay: float = 0.0
    """Adam weight decay (L2), >= 0."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas [beta1, beta2], each in [0, 1)."""
    grad_clip: float = 0.0
    """Gradient clipping norm; 0 disables it. Written explicitly into the DeepSpeed config."""
    seed: int = 42
    """Random seed for Python, NumPy and torch, in [0, 2**32)."""
    patience: int = 40
    """Early stopping: evaluations without improvement of select_metric before stopping."""
    eval_every: int = 1
    """Evaluate on the validation split every this many epochs."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0 to 2 (optimizer state and gradient partitioning)."""
    num_threads: int | None = None
    """torch CPU threads (torch.set_num_threads); null leaves torch's default."""
    log_every: int = 20
    """Training steps between progress-bar loss updates."""
    bf16_mode: str = "auto"
    """How bf16 is run: deepspeed (bf16 weights with DeepSpeed's fp32 master copy and overflow
    checks), autocast (fp32 weights, torch.autocast bf16 around the forward, DeepSpeed in fp32 with
    fused Adam: nothing read on the host), or auto: autocast on one process at ZeRO stage 0,
    deepspeed with several ranks or ZeRO. train.cuda_graphs implies autocast."""
    cuda_graphs: bool = False
    """Capture each member's whole training step (forward, backward, Adam) as CUDA graphs, one per
    batch shape, and replay them (engine/graphed_step.py). One GPU, ZeRO stage 0; bf16 comes from
    autocast over fp32 weights. Off until a GPU run of the device check has passed it (README)."""
    dist_timeout_s: float = 300.0
    """Seconds a collective (gradient all-reduce, evaluation sums) may wait for the other ranks
    before the run stops, naming the rank that is gone (engine/rank_watch.py)."""
    grad_merge: str = "sum"
    """How a model's losses become one gradient. sum: the gradient of their sum; pcgrad: one
    gradient per loss, projected where they conflict and merged as ADRec's public code does
    (docs/peers.md; adrec only, one backward per loss)."""
    ds_config: str | None = None
    """Optional DeepSpeed JSON (e.g. configs/deepspeed/zero2_offload.json) merged over the config the
    engine builds, for settings the run config does not cover (ZeRO offload, comms, ...)."""


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    """Cut-offs K for HR@K and NDCG@K."""
    protocol: str = "full"
    """full: the user's history items excluded (-inf), padding/mask rows never ranked.
    compat: the authors' quirk, history items scored 0 and padding/mask rows kept as candidates.
    unmasked: DiffuRec's and ADRec's evaluation, history items and the padding row kept as
    candidates with their scores (the mask row, which their vocabularies lack, is not)."""
    batch_size: int = 1024
    """Users per evaluation batch."""
    item_chunk: int = 65536
    """Items scored at a time: evaluation holds batch_size x item_chunk scores and a running top-K,
    never a users x items matrix, so a catalog of any size ranks in bounded memory."""
    select_metric: str = "NDCG@20"
    """Validation metric for model selection and early stopping: HR@K or NDCG@K, K in ks."""


@dataclass
class KernelsConfig:
    backend: str = "auto"
    """Implementation of the fused ops (diffusion trajectory, gated fusion): auto (fused on CUDA,
    eager elsewhere), fused (raise if the fused op cannot run) or eager (the reference PyTorch
    path). The environment variable ADAREC_KERNELS, when set, overrides this value."""
    ce_item_chunk: int = 32768
    """Items per chunk of the full-softmax cross-entropy (model.rec_loss ce and the peers' CE).
    A catalog larger than this trains without a rows x items logit matrix: the log-sum-exp is
    accumulated chunk by chunk and the chunk logits are recomputed in the backward; a catalog
    that fits one chunk uses the plain matmul + cross-entropy (docs/catalogs.md)."""


@dataclass
class ProfilingConfig:
    nvtx: bool = False
    """NVTX ranges around every phase of a step (data, controller, trajectory, experts, fusion,
    losses, backward, optimizer step, evaluation) for Nsight; free when off."""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset file and sequence preparation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture and loss weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization, early stopping and runtime settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Ranking evaluation settings."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Choice between the fused kernels and their eager twins."""
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    """Instrumentation for profilers."""


# ----------------------------------------------------------------------------- docs and types


@functools.cache
def _field_docs(cls: type) -> tuple[tuple[str, str], ...]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs = []
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs.append((node.target.id, inspect.cleandoc(after.value.value)))
    return tuple(docs)


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to its attribute docstring (read from the source)."""
    return dict(_field_docs(cls))


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _key_types(section_cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}


def _optional_inner(tp: object) -> object | None:
    """X for Optional[X], else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return None


def _describe(tp: object) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_NAMES[typing.get_args(tp)[0]][1]}"
    return _NAMES[tp][0]


def _type_name(tp: object) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)}|null"
    if typing.get_origin(tp) is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    return tp.__name__


def _coerce(value: object, tp: object, key: str, where: str, nullable: bool = False) -> object:
    """Return ``value`` checked against annotation ``tp`` (ints become floats for float)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, where, nullable=True)
    if typing.get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            elem = typing.get_args(tp)[0]
            return [_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    wanted = _describe(tp) + (" or null" if nullable else "")
    raise ConfigError(f"{where}: {key} must be {wanted}, got {value!r} ({type(value).__name__})")


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


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


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


# ----------------------------------------------------------------------------- building


def _section_cls(section: str, where: str) -> type:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r}; valid sections: "
                          f"{', '.join(sections)}")
    return sections[section]


def _set(cfg: RunConfig, section: str, key: str, value: object, where: str,
         sources: dict[str, str]) -> None:
    key_types = _key_types(_section_cls(section, where))
    if key not in key_types:
        raise ConfigError(f"{where}: unknown key '{section}.{key}'; valid keys in {section!r}: "
                          f"{', '.join(key_types)}")
    dotted = f"{section}.{key}"
    setattr(getattr(cfg, section), key, _coerce(value, key_types[key], dotted, where))
    sources.pop(dotted, None)  # keep insertion order = order of setting, newest last
    sources[dotted] = where


def _merge(cfg: RunConfig, data: object, where: str, sources: dict[str, str]) -> RunConfig:
    if data is None:
        return cfg
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping of sections "
                          f"({', '.join(_sections())}), got {type(data).__name__}")
    for section, body in data.items():
        _section_cls(str(section), where)
        if body is None:  # "train:" with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, "
                              f"got {body!r} ({type(body).__name__})")
        for key, value in body.items():
            _set(cfg, str(section), str(key), value, where, sources)
    return cfg


def _apply(cfg: RunConfig, overrides: Sequence[str], prefix: str,
           sources: dict[str, str]) -> RunConfig:
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        where = f"{prefix} {item}"
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep:
            raise ConfigError(f"{where}: an override must look like section.key=value "
                              "(no '=' found)")
        section, dot, key = dotted.partition(".")
        if not dot or not section or not key or "." in key:
            raise ConfigError(f"{where}: the key must be section.key (one dot), got {dotted!r}; "
                              f"sections: {', '.join(_sections())}")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: cannot parse value {text!r}: {problem}") from None
        _set(cfg, section, key, value, where, sources)
    return cfg


# ----------------------------------------------------------------------------- validation

_METRIC = re.compile(r"^(HR|NDCG)@([0-9]+)$")


def _validate(cfg: RunConfig, where: str, sources: Mapping[str, str]) -> None:
    def need(ok: bool, key: str, rule: str, also: Sequence[str] = ()) -> None:
        """Raise unless ok, naming where the newest of ``key`` and ``also`` was set."""
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            set_keys = [k for k in sources if k in (key, *also)]
            origin = sources[set_keys[-1]] if set_keys else where
            raise ConfigError(f"{origin}: {key} {rule}, got {value!r}")

    def choice(key: str, options: Sequence[str]) -> None:
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) in options, key,
             f"must be one of {', '.join(options)}")

    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    need(bool(d.path), "data.path", "must not be empty")
    need(d.max_len >= 1, "data.max_len", "must be >= 1")
    need(d.shorten_seq_to is None or d.shorten_seq_to >= 1, "data.shorten_seq_to",
         "must be >= 1 or null")
    need(d.max_users is None or d.max_users >= 1, "data.max_users", "must be >= 1 or null")
    need(d.augmented_prefix >= 0, "data.augmented_prefix", "must be >= 0")
    need(d.group_batches >= 1, "data.group_batches", "must be >= 1")
    need(d.width_buckets is None or all(w >= 1 for w in d.width_buckets), "data.width_buckets",
         "must be a list of widths >= 1 or null")

    choice("model.name", MODEL_NAMES)
    for key in ("hidden_size", "num_layers", "num_heads", "num_intent_clusters"):
        need(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    need(m.hidden_size % m.num_heads == 0, "model.hidden_size",
         f"must be divisible by model.num_heads ({m.num_heads})", also=("model.num_heads",))
    for key in ("hidden_dropout", "attn_dropout"):
        need(0.0 <= getattr(m, key) < 1.0, f"model.{key}", "must be in [0, 1)")
    need(m.initializer_range > 0, "model.initializer_range", "must be > 0")
    choice("model.rec_loss", ("bce", "ce"))
    choice("model.prototype", ("none", "shift", "concat"))
    for key in ("cf_weight", "intent_cf_weight", "trade_off"):
        need(getattr(m, key) >= 0, f"model.{key}", "must be >= 0")
    need(m.cl_temperature > 0, "model.cl_temperature", "must be > 0")
    if m.name == "adarec-dual" or (m.name == "adarec" and m.level_schedule == "authors"):
        need(0 <= m.max_depth <= m.diffusion_steps, "model.max_depth", "must be in [0, model.diffusion_steps]",
             also=("model.diffusion_steps",))
    need(m.diffusion_steps >= 1, "model.diffusion_steps", "must be >= 1")
    need(m.max_depth >= 0, "model.max_depth", "must be >= 0")
    need(m.gumbel_tau > 0, "model.gumbel_tau", "must be > 0")
    need(m.denoiser_mult >= 1, "model.denoiser_mult", "must be >= 1")
    for key in ("lambda_deno", "lambda_cont", "lambda_expl"):
        need(getattr(m, key) >= 0, f"model.{key}", "must be >= 0")
    need(m.cont_temperature > 0, "model.cont_temperature", "must be > 0")
    choice("model.depth_gradient", ("probe", "all", "none"))
    choice("model.level_layout", ("auto", "grid", "compact"))
    choice("model.eval_noise", ("zero", "fixed", "clean"))
    choice("model.level_schedule", LEVEL_SCHEDULES)
    need(0.0 < m.final_signal < 1.0, "model.final_signal", "must be in (0, 1)")
    need(all(a in ABLATIONS for a in m.ablate) and len(set(m.ablate)) == len(m.ablate), "model.ablate",
         f"must list distinct components among {', '.join(ABLATIONS)}")
    need(m.fixed_depth is None or 0 <= m.fixed_depth <= m.max_depth, "model.fixed_depth",
         "must be in [0, model.max_depth] or null", also=("model.max_depth",))
    need(0.0 < m.crop_ratio <= 1.0, "model.crop_ratio", "must be in (0, 1]")
    for key in ("mask_ratio", "reorder_ratio"):
        need(0.0 <= getattr(m, key) <= 1.0, f"model.{key}", "must be in [0, 1]")
    need(0.0 <= m.emb_dropout < 1.0, "model.emb_dropout", "must be in [0, 1)")
    choice("model.noise_schedule", ("trunc_lin", "linear"))
    need(1 <= m.sample_steps <= m.diffusion_steps, "model.sample_steps", "must be in [1, model.diffusion_steps]",
         also=("model.diffusion_steps",))
    need(m.lambda_uncertainty >= 0, "model.lambda_uncertainty", "must be >= 0")
    for key in ("denoiser_layers", "prefix_items", "denoiser_channels"):
        need(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    for key in ("pretrain_epochs", "freeze_epochs"):
        need(getattr(m, key) >= 0, f"model.{key}", "must be >= 0")
    need(m.guidance_weight >= 0, "model.guidance_weight", "must be >= 0")
    need(0.0 <= m.cond_drop < 1.0, "model.cond_drop", "must be in [0, 1)")

    for key in ("epochs", "batch_size", "patience", "eval_every", "log_every"):
        need(getattr(t, key) >= 1, f"train.{key}", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in t.adam_betas),
         "train.adam_betas", "must be two numbers in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    need(0 <= t.seed < 2**32, "train.seed", "must be in [0, 2**32)")
    choice("train.device", ("auto", "cpu", "cuda"))
    choice("train.precision", ("auto", "fp32", "bf16"))
    choice("train.bf16_mode", ("auto", "deepspeed", "autocast"))
    need(0 <= t.zero_stage <= 2, "train.zero_stage",
         f"must be 0, 1 or 2 ({ZERO3_REFUSED})")
    need(t.num_threads is None or t.num_threads >= 1, "train.num_threads", "must be >= 1 or null")
    need(t.dist_timeout_s > 0, "train.dist_timeout_s", "must be > 0 seconds")
    choice("train.grad_merge", ("sum", "pcgrad"))
    need(t.grad_merge == "sum" or m.name == "adrec", "train.grad_merge",
         "pcgrad merges ADRec's two losses; it needs model.name adrec", also=("model.name",))
    need(not (t.grad_merge == "pcgrad" and t.cuda_graphs), "train.grad_merge",
         "pcgrad runs one backward per loss, which train.cuda_graphs does not capture", also=("train.cuda_graphs",))

    need(len(e.ks) > 0 and all(k >= 1 for k in e.ks), "eval.ks",
         "must be a non-empty list of integers >= 1")
    need(len(set(e.ks)) == len(e.ks), "eval.ks", "must not repeat a cut-off")
    choice("eval.protocol", ("full", "compat", "unmasked"))
    choice("kernels.backend", ("auto", "fused", "eager"))
    need(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(e.item_chunk >= 1, "eval.item_chunk", "must be >= 1")
    need(cfg.kernels.ce_item_chunk >= 1, "kernels.ce_item_chunk", "must be >= 1")
    match = _METRIC.match(e.select_metric)
    need(match is not None, "eval.select_metric", "must look like HR@K or NDCG@K")
    need(int(match.group(2)) in e.ks, "eval.select_metric",
         f"needs its K in eval.ks {e.ks}", also=("eval.ks",))


# ----------------------------------------------------------------------------- public API


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Check every value of ``cfg``; raise ConfigError naming ``where`` on the first problem."""
    _validate(cfg, where, {})
    return cfg


def config_from_dict(d: object, where: str = "config", *, check: bool = True) -> RunConfig:
    """Build a RunConfig from a {section: {key: value}} mapping merged onto the defaults."""
    sources: dict[str, str] = {}
    cfg = _merge(RunConfig(), d, where, sources)
    if check:
        _validate(cfg, where, sources)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: Sequence[str], where: str = "--set") -> RunConfig:
    """Return a validated copy of ``cfg`` with ``section.key=value`` overrides applied."""
    sources: dict[str, str] = {}
    new = _apply(copy.deepcopy(cfg), overrides, where, sources)
    _validate(new, "config", sources)
    return new


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (None: defaults only), then the overrides."""
    where = str(path) if path is not None else "config"
    data = _read_yaml(Path(path)) if path is not None else None
    sources: dict[str, str] = {}
    cfg = _merge(RunConfig(), data, where, sources)
    _apply(cfg, overrides, "--set", sources)
    _validate(cfg, where, sources)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain {section: {key: value}} dict of ``cfg`` (YAML/JSON serializable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# adarec run config (defaults + config file + overrides, resolved)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
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
    """A table of every key: ``section.key  type  default  description``."""
    rows = [("key", "type", "default", "description")]
    for section, cls in _sections().items():
        docs = field_docs(cls)
        defaults = cls()
        for name, tp in _key_types(cls).items():
            rows.append((f"{section}.{name}", _type_name(tp),
                         json.dumps(getattr(defaults, name)), " ".join(docs[name].split())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=False)) + "  " + r[3] for r in rows
    )
