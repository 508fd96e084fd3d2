"""Config loading, overrides, type and value checks, docs and data-path resolution."""

import dataclasses
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
    assert C._coerce(True, bool, "s.flag", "w") is True
    with pytest.raises(ConfigError, match=r"w: s.flag must be true or false, got 1 \(int\)"):
        C._coerce(1, bool, "s.flag", "w")


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
    assert valid == [f.name for f in dataclasses.fields(TrainConfig)]


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
    ("eval.select_metric=MRR@20", "eval.select_metric must look like HR@K or NDCG@K"),
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
    names = [f.name for f in dataclasses.fields(cls)]
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
    assert lines[0].split() == ["key", "type", "default", "description"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            row = next(line for line in lines if line.split()[0] == f"{section}.{f.name}")
            assert field_docs(cls)[f.name].split()[0] in row
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
