"""Config loading, overrides, type and value checks, docs and data-path resolution."""

import json
import math
import re
from pathlib import Path

import pytest

from adarec import config as C
from adarec.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_keys,
    field_docs,
    key_schemas,
    load_config,
    resolve_data_path,
    save_config,
)
from adarec.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}

# (file, model, data file, num_layers, num_intent_clusters, trade_off, rec_loss)
EXPECTED = {
    "elcrec_beauty.yaml": ("elcrec", "Beauty.txt", 1, 256, 10.0, "bce"),
    "elcrec_sports.yaml": ("elcrec", "Sports_and_Outdoors.txt", 2, 512, 1.0, "bce"),
    "elcrec_toys.yaml": ("elcrec", "Toys_and_Games.txt", 3, 512, 1.0, "bce"),
    "sasrec_beauty.yaml": ("sasrec", "Beauty.txt", 2, None, None, "ce"),
    "sasrec_sports.yaml": ("sasrec", "Sports_and_Outdoors.txt", 2, None, None, "ce"),
    "sasrec_toys.yaml": ("sasrec", "Toys_and_Games.txt", 2, None, None, "ce"),
}

KERNEL_MODULES = ("adarec.kernels.trajectory", "adarec.kernels.linear_ce")   # what adarec/backends.py loads


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped configs


def test_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert set(EXPECTED) | {"quickstart_beauty.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    if cfg.data.path == "data/Yelp.txt":  # not shipped; the config documents where it goes
        assert "data/Yelp.txt" in path.read_text()
    elif cfg.data.augmented_prefix:      # written by `adarec augment`; the config says how
        assert cfg.data.path.startswith("runs/diffuasr_") and "adarec augment" in path.read_text()
    elif "synthetic" in cfg.data.path:   # generated; the config gives the command that writes it
        assert f"python -m adarec.data.synthetic --items 1000000 --users 200000 --output {cfg.data.path}" \
            in path.read_text()
    else:
        assert resolve_data_path(cfg).is_file()
    assert path.read_text().startswith("#"), "every shipped config starts with a comment header"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_settings(name):
    model, data_file, layers, clusters, trade_off, rec_loss = EXPECTED[name]
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.name == model and cfg.model.rec_loss == rec_loss
    assert cfg.data.path == f"data/{data_file}" and cfg.data.max_len == 50
    assert cfg.model.num_layers == layers and cfg.model.hidden_size == 64
    assert cfg.model.num_heads == 2
    assert (cfg.model.hidden_dropout, cfg.model.attn_dropout) == (0.5, 0.5)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (256, 1e-3, 300)
    assert (cfg.train.patience, cfg.train.eval_every) == (40, 1)
    if model == "elcrec":
        assert cfg.model.num_intent_clusters == clusters and cfg.model.trade_off == trade_off
        assert (cfg.model.cf_weight, cfg.model.intent_cf_weight) == (0.1, 0.1)


def test_quickstart_is_a_short_cpu_sasrec_run():
    cfg = load_config(ROOT / "configs" / "quickstart_beauty.yaml")
    assert (cfg.model.name, cfg.model.rec_loss, cfg.train.device) == ("sasrec", "ce", "cpu")
    assert cfg.train.epochs == 3 and cfg.data.path == "data/Beauty.txt"


# ----------------------------------------------------------------------------- defaults, overrides


def test_defaults():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.data.path == "data/Beauty.txt" and cfg.data.shorten_seq_to is None
    assert cfg.train.adam_betas == [0.9, 0.999] and cfg.eval.ks == [5, 10, 20]
    assert cfg.train.epochs == 300 and cfg.train.patience == 40 and cfg.model.name == "sasrec"
    assert cfg.eval.select_metric == "NDCG@20" and cfg.train.precision == "auto"
    assert RunConfig().train.adam_betas is not RunConfig().train.adam_betas


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "train:\n", "y.yaml")) == RunConfig()


def test_file_values_and_float_exponent(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-3\n  epochs: 7\nmodel:\n  trade_off: 10\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7
    assert cfg.model.trade_off == 10.0 and isinstance(cfg.model.trade_off, float)


def test_overrides_of_every_type(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  num_threads: 2\n")
    cfg = load_config(path, [
        "train.epochs=9",                 # int, override beats file
        "train.lr=2e-3",                  # float written with an exponent
        "train.weight_decay=1",           # int accepted for float, converted
        "model.name=elcrec",              # str
        "data.shorten_seq_to=5",          # Optional[int] set
        "train.num_threads=null",         # Optional[int] cleared
        "eval.ks=[1,5]",                  # list[int]
        "eval.select_metric=HR@5",
        "train.adam_betas=[0, 0.98]",     # list[float], int element converted
        "data.path=some dir/with=equals.txt",  # only the first '=' splits
    ])
    assert cfg.train.epochs == 9
    assert cfg.train.lr == 2e-3
    assert cfg.train.weight_decay == 1.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.model.name == "elcrec"
    assert cfg.data.shorten_seq_to == 5 and cfg.train.num_threads is None
    assert cfg.eval.ks == [1, 5] and cfg.eval.select_metric == "HR@5"
    assert cfg.train.adam_betas == [0.0, 0.98]
    assert all(isinstance(b, float) for b in cfg.train.adam_betas)
    assert cfg.data.path == "some dir/with=equals.txt"


def test_bool_type_is_checked():
    assert load_config(None, ["profiling.nvtx=true"]).profiling.nvtx is True
    with pytest.raises(ConfigError, match=r"^--set profiling.nvtx=1: profiling.nvtx must be true or false, "
                       r"got 1 \(int\)$"):
        load_config(None, ["profiling.nvtx=1"])


def test_apply_overrides_copies_and_validates():
    base = RunConfig()
    new = apply_overrides(base, ["train.epochs=5", "eval.ks=[10, 20]"])
    assert new.train.epochs == 5 and new.eval.ks == [10, 20]
    assert base.train.epochs == 300 and base.eval.ks == [5, 10, 20]
    with pytest.raises(ConfigError, match=r"^--set model.num_heads=3: model.hidden_size"):
        apply_overrides(base, ["model.num_heads=3"])


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown key 'train.lrr'; valid keys in 'train': ")
    valid = msg.split("valid keys in 'train': ")[1].split(", ")
    assert valid == list(TrainConfig.model_fields)


def test_unknown_key_in_override_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.hiden_size=3"])
    msg = str(err.value)
    assert msg.startswith("--set model.hiden_size=3: unknown key 'model.hiden_size'")
    assert "valid keys in 'model': name, hidden_size, num_layers" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'; valid sections: data, model, "
                       "train, eval"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"^--set optim.lr=1: unknown section 'optim'"):
        load_config(None, ["optim.lr=1"])


@pytest.mark.parametrize("item, fragment", [
    ("train.lr", "no '=' found"),
    ("lr=0.1", "section.key"),
    ("train.lr.x=1", "section.key"),
    (".lr=1", "section.key"),
    ("eval.ks=[1,", "cannot parse value"),
])
def test_malformed_override(item, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(None, [item])
    assert str(err.value).startswith(f"--set {item}: ")


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize("item, message", [
    ("train.epochs=abc", "train.epochs must be an integer, got 'abc' (str)"),
    ("train.epochs=true", "train.epochs must be an integer, got True (bool)"),
    ("train.epochs=5.0", "train.epochs must be an integer, got 5.0 (float)"),
    ("train.lr=abc", "train.lr must be a number, got 'abc' (str)"),
    ("train.lr=false", "train.lr must be a number, got False (bool)"),
    ("train.lr=.inf", "train.lr must be a number, got inf (float)"),
    ("model.name=5", "model.name must be a string, got 5 (int)"),
    ("eval.ks=[5, x]", "eval.ks[1] must be an integer, got 'x' (str)"),
    ("eval.ks=[5, true]", "eval.ks[1] must be an integer, got True (bool)"),
    ("eval.ks=20", "eval.ks must be a list of integers, got 20 (int)"),
    ("train.adam_betas=[0.9, b]", "train.adam_betas[1] must be a number, got 'b' (str)"),
    ("data.shorten_seq_to=x", "data.shorten_seq_to must be an integer or null, got 'x' (str)"),
    ("train.device=null", "train.device must be a string, got None (NoneType)"),
])
def test_wrong_type_in_override(item, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert str(err.value) == f"--set {item}: {message}"


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.epochs must be an integer, got 'abc' (str)"


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("item, fragment", [
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.batch_size=-1", "train.batch_size must be >= 1"),
    ("train.lr=0", "train.lr must be > 0"),
    ("data.max_len=0", "data.max_len must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size must be >= 1"),
    ("model.num_layers=0", "model.num_layers must be >= 1"),
    ("model.num_heads=0", "model.num_heads must be >= 1"),
    ("model.num_heads=3", "model.hidden_size must be divisible by model.num_heads (3)"),
    ("model.hidden_dropout=1", "model.hidden_dropout must be in [0, 1)"),
    ("model.attn_dropout=-0.1", "model.attn_dropout must be in [0, 1)"),
    ("model.rec_loss=mse", "model.rec_loss must be one of bce, ce, got 'mse'"),
    ("model.name=gru4rec", "model.name must be one of sasrec, elcrec"),
    ("eval.protocol=partial", "eval.protocol must be one of full, compat"),
    ("train.device=tpu", "train.device must be one of auto, cpu, cuda"),
    ("train.precision=fp16", "train.precision must be one of auto, fp32, bf16"),
    ("train.zero_stage=3", "train.zero_stage must be 0, 1 or 2"),
    ("train.zero_stage=-1", "train.zero_stage must be 0, 1 or 2"),
    ("eval.ks=[]", "eval.ks must be a non-empty list"),
    ("eval.ks=[0, 20]", "eval.ks must be a non-empty list of integers >= 1"),
    ("data.shorten_seq_to=0", "data.shorten_seq_to must be >= 1 or null"),
    ("eval.select_metric=MAP@20", "eval.select_metric must be HR@K, NDCG@K or MRR@K"),
    ("eval.select_metric=NDCG@50", "eval.select_metric needs its K in eval.ks [5, 10, 20]"),
    ("train.adam_betas=[0.9]", "train.adam_betas must be two numbers in [0, 1)"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
])
def test_value_validation(item, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert str(err.value).startswith(f"--set {item}: {fragment}")


def test_select_metric_follows_ks():
    with pytest.raises(ConfigError, match="eval.select_metric needs its K in eval.ks"):
        load_config(None, ["eval.ks=[1,5]"])
    assert load_config(None, ["eval.ks=[1,5]", "eval.select_metric=HR@5"]).eval.ks == [1, 5]


def test_bad_value_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  num_heads: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.hidden_size must be divisible"):
        load_config(path)
    # a later override can repair a value that the file got wrong
    assert load_config(path, ["model.num_heads=4"]).model.num_heads == 4


def test_extended_model_names(monkeypatch):
    monkeypatch.setattr(C, "MODEL_NAMES", (*C.MODEL_NAMES, "adarec"))
    assert load_config(None, ["model.name=adarec"]).model.name == "adarec"


# ----------------------------------------------------------------------------- files


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: [1, 2\nmodel: {\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid YAML at line ")
    assert "line 4" in msg or "line 5" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3.*duplicate key 'epochs'"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- train\n- model\n")
    with pytest.raises(ConfigError, match=rf"^{path}: the top level must be a mapping"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'nope.yaml'}: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "elcrec_toys.yaml", [
        "train.lr=3e-5", "data.shorten_seq_to=3", "eval.ks=[1, 20]", "train.num_threads=2",
        "train.adam_betas=[0.8, 0.95]", "model.trade_off=0.25", "data.path=x y/z.txt",
    ])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    again = load_config(out)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    save_config(RunConfig(), out)  # overwrite in place
    assert load_config(out) == RunConfig()


def test_config_from_dict_checks():
    with pytest.raises(ConfigError, match=r"^run.json: unknown key 'eval.k'"):
        config_from_dict({"eval": {"k": [5]}}, "run.json")
    with pytest.raises(ConfigError, match=r"^run.json: train.epochs must be >= 1"):
        config_from_dict({"train": {"epochs": 0}}, "run.json")


# ----------------------------------------------------------------------------- docs


@pytest.mark.parametrize("section, cls", SECTIONS.items())
def test_field_docs_cover_every_field(section, cls):
    docs = field_docs(cls)
    names = list(cls.model_fields)
    assert list(docs) == names
    assert all(len(doc.strip()) > 10 for doc in docs.values()), docs
    assert getattr(RunConfig(), section).__class__ is cls


def test_field_docs_reads_the_docstring_after_the_field():
    assert field_docs(TrainConfig)["epochs"] == "Maximum number of training epochs."
    assert "\n" in field_docs(EvalConfig)["protocol"]  # multi-line docs are kept, dedented
    assert not field_docs(EvalConfig)["protocol"].splitlines()[1].startswith(" ")


def test_describe_keys_lists_every_key():
    table = describe_keys()
    lines = table.splitlines()
    assert lines[0].split() == ["key", "type", "default", "values", "description"]
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            row = next(line for line in lines if line.split()[0] == f"{section}.{name}")
            assert field_docs(cls)[name].split()[0] in row
    row = next(line for line in lines if line.startswith("eval.ks "))
    assert row.split()[1:4] == ["list[int]", "[5,", "10,"]
    row = next(line for line in lines if line.startswith("data.shorten_seq_to "))
    assert row.split()[1:3] == ["int|null", "null"]


# ----------------------------------------------------------------------------- data path


def test_resolve_data_path_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_data_path(RunConfig())
    assert path == ROOT / "data" / "Beauty.txt" and path.is_file()


def test_resolve_data_path_prefers_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "Beauty.txt").write_text("1 1 2 3\n")
    assert resolve_data_path(RunConfig()) == tmp_path / "data" / "Beauty.txt"
    absolute = tmp_path / "data" / "Beauty.txt"
    assert resolve_data_path(DataConfig(path=str(absolute))) == absolute


def test_resolve_data_path_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data.path 'data/Nope.txt': file not found"):
        resolve_data_path(DataConfig(path="data/Nope.txt"))


# ----------------------------------------------------------------------------- generated from the fields

SCHEMAS = key_schemas()
# Settings another key needs before a value is valid (rules between keys).
NEEDS = {("train.grad_merge", "pcgrad"): ["model.name=adrec"]}


def one_line_error(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert "\n" not in msg and "pydantic" not in msg.lower() and "validation error" not in msg.lower(), msg
    return msg


def help_row(key):
    return next(line for line in describe_keys().splitlines() if line.split()[0] == key)


def choices(schema):
    """The values a choice key lists, and whether the key holds a list of them."""
    if "enum" in schema:
        return list(schema["enum"]), False
    if schema.get("type") == "array" and "enum" in schema["items"]:
        return list(schema["items"]["enum"]), True
    return None, False


CHOICE_KEYS = sorted(key for key, schema in SCHEMAS.items() if choices(schema)[0])


def test_every_choice_key_is_found():
    assert {"model.name", "model.rec_loss", "model.ablate", "model.level_schedule", "train.device",
            "train.grad_merge", "eval.protocol", "kernels.backend"} <= set(CHOICE_KEYS)
    assert choices(SCHEMAS["model.name"])[0] == list(C.MODEL_NAMES)
    assert choices(SCHEMAS["model.ablate"])[0] == list(C.ABLATIONS)


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_every_listed_choice_is_accepted_and_others_refused(key):
    section, name = key.split(".")
    options, is_list = choices(SCHEMAS[key])
    assert "|".join(options) in help_row(key)  # the help lists exactly these
    for option in options:
        value = [option] if is_list else option
        cfg = load_config(None, [f"{key}={json.dumps(value)}", *NEEDS.get((key, option), [])])
        assert getattr(getattr(cfg, section), name) == value
    bad = "not-a-choice"
    item = f"{key}={json.dumps([bad] if is_list else bad)}"
    msg = one_line_error([item])
    assert msg.startswith(f"--set {item}: {key} must ") and repr(bad) in msg
    if not is_list:
        assert msg == f"--set {item}: {key} must be one of {', '.join(options)}, got {bad!r}"


def bounds(schema):
    """(bound keyword, bound) pairs of a numeric key or of a list key's items."""
    target = schema["items"] if schema.get("type") == "array" else schema
    kinds = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    return [(kind, target[kind]) for kind in kinds if kind in target], target["type"]


BOUNDED = sorted((key, kind, bound) for key, schema in SCHEMAS.items() for kind, bound in bounds(schema)[0])


def outside(kind, bound, kind_of_number):
    """The nearest value on the wrong side of a bound."""
    if kind.startswith("exclusive"):
        return bound
    step = 1 if kind_of_number == "integer" else None
    down = kind == "minimum"
    if step:
        return bound - 1 if down else bound + 1
    return math.nextafter(float(bound), -math.inf if down else math.inf)


def test_every_bounded_key_is_found():
    keys = {key for key, _, _ in BOUNDED}
    assert {"data.max_len", "model.hidden_dropout", "model.final_signal", "train.seed", "train.zero_stage",
            "train.adam_betas", "eval.ks", "data.width_buckets", "data.min_user_items", "data.min_item_users",
            "kernels.ce_item_chunk"} <= keys
    assert len(BOUNDED) >= 60


@pytest.mark.parametrize("key, kind, bound", BOUNDED, ids=[f"{k}-{kind}" for k, kind, _ in BOUNDED])
def test_every_range_bound_is_enforced(key, kind, bound):
    schema = SCHEMAS[key]
    _, number = bounds(schema)
    value = outside(kind, bound, number)
    text = repr(value)
    if schema.get("type") == "array":  # a list of the right length with one item out of range
        default = list(schema["default"] or [bound] * max(schema.get("minItems", 1), 1))
        text = repr([value, *default[1:]])
    item = f"{key}={text}"
    msg = one_line_error([item])
    assert msg.startswith(f"--set {item}: {key} must "), msg
    if schema.get("type") != "array" and kind in ("minimum", "maximum"):  # the bound itself is valid
        section, name = key.split(".")
        needs = {"model.hidden_size": ["model.num_heads=1"], "model.diffusion_steps": ["model.sample_steps=1"]}
        cfg = load_config(None, [f"{key}={bound!r}", *needs.get(key, [])])
        assert getattr(getattr(cfg, section), name) == bound


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_null_is_accepted_exactly_where_the_type_says(key):
    schema, section, name = SCHEMAS[key], *key.split(".")
    assert help_row(key).split()[1].endswith("|null") == schema["nullable"]
    if schema["nullable"]:
        assert getattr(getattr(load_config(None, [f"{key}=null"]), section), name) is None
    else:
        assert one_line_error([f"{key}=null"]).endswith(", got None (NoneType)")


def test_help_lists_every_field_with_its_default_type_values_and_text():
    rows = {line.split()[0]: line for line in describe_keys().splitlines()[1:]}
    expected = [f"{section}.{name}" for section, cls in C._sections().items() for name in cls.model_fields]
    assert list(rows) == expected
    for section, cls in C._sections().items():
        defaults, docs = cls(), field_docs(cls)
        for name in cls.model_fields:
            row = rows[f"{section}.{name}"]
            head = re.split(r"\s{2,}", row, maxsplit=4)
            assert head[2] == json.dumps(getattr(defaults, name)), row
            assert head[4] == " ".join(docs[name].split()), row
    assert re.split(r"\s{2,}", rows["model.hidden_dropout"])[1:4] == ["float", "0.5", "[0, 1)"]
    assert re.split(r"\s{2,}", rows["train.epochs"])[1:4] == ["int", "300", ">= 1"]
    assert re.split(r"\s{2,}", rows["model.rec_loss"])[1:4] == ["str", '"bce"', "bce|ce"]


def test_kernels_backend_help_says_what_auto_does(monkeypatch):
    """The help of kernels.backend against adarec/backends.py: auto is eager on a CPU (but the native
    gated fusion) and on CUDA until GPU_PATHS_VERIFIED, fused after; fused refuses a CPU."""
    torch = pytest.importorskip("torch")
    from adarec import backends, ops
    from adarec.diffusion import diffusion_trajectory
    from adarec.fusion import gated_fusion
    from adarec.linear_ce import chunked_linear_cross_entropy, kept_softmax_linear_cross_entropy, linear_cross_entropy

    text = " ".join(field_docs(C.KernelsConfig)["backend"].split())
    for phrase in ("auto: on a CPU the eager trajectory, the native gated fusion (eager when the library is not "
                   "built) and a PyTorch cross-entropy (chunked above kernels.ce_item_chunk)",
                   "on CUDA the eager trajectory and gated fusion until a GPU run of the device check has verified "
                   "the GPU paths (backends.GPU_PATHS_VERIFIED", "the fused ones after",
                   "the Triton cross-entropy once backends.LINEAR_CE_GPU_VERIFIED (before: chunked above "
                   "kernels.ce_item_chunk, full logits below)", "TRITON_INTERPRET=1", "ADAREC_KERNELS"):
        assert phrase in text
    assert text in help_row("kernels.backend")

    # The kernel modules imported under the session's TRITON_INTERPRET first: one first imported
    # below, without the interpreter, would bind its kernels to a GPU driver for every later test.
    for module in KERNEL_MODULES:
        backends._load_triton(module, "__name__")
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.trajectory_function("auto", cpu) is diffusion_trajectory
    native = backends._native_fusion_problem(cpu) is None
    assert backends.fusion_function("auto", cpu) is (ops.gated_fusion if native else gated_fusion)
    assert backends.linear_ce_function("auto", cpu, 100, 1000) is kept_softmax_linear_cross_entropy
    assert backends.linear_ce_function("auto", cpu, 1001, 1000) is chunked_linear_cross_entropy
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        backends.check_backend_runs_here("fused", cpu)
    monkeypatch.setattr(backends, "GPU_PATHS_VERIFIED", False)
    monkeypatch.setattr(backends, "LINEAR_CE_GPU_VERIFIED", False)
    assert backends.trajectory_function("auto", cuda) is diffusion_trajectory
    assert backends.fusion_function("auto", cuda) is gated_fusion
    assert backends.linear_ce_function("auto", cuda, 100, 1000) is linear_cross_entropy
    assert backends.linear_ce_function("auto", cuda, 1001, 1000) is chunked_linear_cross_entropy
    monkeypatch.setattr(backends, "GPU_PATHS_VERIFIED", True)
    fused = backends._load_triton("adarec.kernels.trajectory", "fused_diffusion_trajectory")
    if not isinstance(fused, str):  # Triton importable: auto takes the fused trajectory once verified
        assert backends.trajectory_function("auto", cuda) is fused


@pytest.mark.parametrize("written, canonical", [
    ("NDCG@20", "NDCG@20"), ("ndcg@20", "NDCG@20"), ("Ndcg@20", "NDCG@20"), ("hr@5", "HR@5"),
    ("MRR@10", "MRR@10"), ("mrr@10", "MRR@10"), ("Mrr@20", "MRR@20"), ("hr@010", "HR@10"), ("NDCG@05", "NDCG@5"),
])
def test_select_metric_is_case_insensitive_and_takes_mrr(written, canonical):
    cfg = load_config(None, [f"eval.select_metric={written}"])
    assert cfg.eval.select_metric == canonical
    cfg.eval.select_metric = written  # an assignment is normalised too
    assert cfg.eval.select_metric == canonical


@pytest.mark.parametrize("item, message", [
    ("eval.select_metric=mrr@50", "eval.select_metric needs its K in eval.ks [5, 10, 20], got 'MRR@50'"),
    ("eval.select_metric=MAP@20", "eval.select_metric must be HR@K, NDCG@K or MRR@K (any case), got 'MAP@20'"),
    ("eval.select_metric=ndcg20", "eval.select_metric must be HR@K, NDCG@K or MRR@K (any case), got 'ndcg20'"),
])
def test_select_metric_refusals(item, message):
    assert one_line_error([item]) == f"--set {item}: {message}"


def test_canonical_select_metric_survives_save_and_load(tmp_path):
    cfg = load_config(None, ["eval.select_metric=mrr@10"])
    again = load_config(save_config(cfg, tmp_path / "c.yaml"))
    assert again.eval.select_metric == "MRR@10" and again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_round_trips_through_save(path, tmp_path):
    cfg = load_config(path)
    out = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(out)
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)
    assert save_config(again, tmp_path / "again.yaml").read_text() == out.read_text()


def test_round_trip_keeps_strings_that_look_like_numbers(tmp_path):
    cfg = load_config(None, ["data.path='1e-3'", "train.ds_config='1.5'", "model.name=adrec"])
    assert cfg.data.path == "1e-3" and cfg.train.ds_config == "1.5"
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_assignment_is_checked_with_a_one_line_error():
    cfg = RunConfig()
    cfg.train.epochs = 3
    cfg.model.trade_off = 2          # an int for a float is converted, as when loaded
    assert cfg.train.epochs == 3 and cfg.model.trade_off == 2.0 and isinstance(cfg.model.trade_off, float)
    with pytest.raises(ConfigError, match=r"^config: train.epochs must be >= 1, got 0$"):
        cfg.train.epochs = 0
    with pytest.raises(ConfigError, match=r"^config: model.rec_loss must be one of bce, ce, got 'mse'$"):
        cfg.model.rec_loss = "mse"
    assert cfg.train.epochs == 3 and cfg.model.rec_loss == "bce"


def test_validate_names_where_and_checks_rules_between_keys():
    cfg = RunConfig()
    cfg.eval.ks = [1, 5]   # each assignment is valid alone; together select_metric NDCG@20 has no K
    with pytest.raises(ConfigError, match=r"^run.yaml: eval.select_metric needs its K in eval.ks \[1, 5\]"):
        C.validate(cfg, "run.yaml")
    cfg.eval.select_metric = "hr@5"
    assert C.validate(cfg) is cfg


def test_rules_between_keys_name_the_newest_source(tmp_path):
    msg = one_line_error(["model.hidden_size=30", "model.num_heads=4"])
    assert msg == "--set model.num_heads=4: model.hidden_size must be divisible by model.num_heads (4), got 30"
    path = write(tmp_path, "model:\n  num_heads: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.hidden_size must be divisible by model.num_heads \(5\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set model.hidden_size=32: model.hidden_size must be divisible"):
        load_config(path, ["model.hidden_size=32"])
    assert config_from_dict({"model": {"num_heads": 3}}, check=False).model.num_heads == 3
    with pytest.raises(ConfigError, match=r"^config: model.num_heads must be >= 1, got 0$"):
        config_from_dict({"model": {"num_heads": 0}}, check=False)


def test_unknown_key_needs_no_pydantic():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"kernels": {"backends": "eager"}}, "x.json")
    assert str(err.value) == ("x.json: unknown key 'kernels.backends'; valid keys in 'kernels': "
                              "backend, ce_item_chunk")


@pytest.mark.parametrize("key", ["min_user_items", "min_item_users"])
def test_data_filters_are_refused_on_an_augmented_file(key):
    """The k-core would count a DiffuASR file's generated items as real ones (docs/running.md)."""
    with pytest.raises(ConfigError, match=rf"^--set data.{key}=3: data.{key} must be 0 for an augmented file"):
        load_config(None, ["data.augmented_prefix=10", f"data.{key}=3"])
    assert getattr(load_config(None, [f"data.{key}=3"]).data, key) == 3
    assert load_config(None, ["data.augmented_prefix=10"]).data.augmented_prefix == 10
