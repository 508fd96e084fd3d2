"""Bad input ends with one clear message (file, line, problem) and exit status 2, no traceback."""

from pathlib import Path

import pytest

from adarec.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/quickstart_beauty.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("1 5 6 7 8\n2 5 x 7 8\n", ":2: "),            # non-integer id
        ("1 5 6 7 8\n2 5 6\n3 1 2\n", ":2: "),           # too-short sequence
        ("1 5 6 7 8\n2 5 0 7 8\n", ":2: "),              # id out of range
        ("1 5 6 7 8\n1 5 6 7 8\n", ":2: "),              # duplicate user
        ("", "no users"),                                # empty file
    ],
)
def test_bad_data_file(tmp_path, capsys, content, expected):
    data = tmp_path / "bad.txt"
    data.write_text(content)
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", f"data.path={data}",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("adarec: error: ") and "bad.txt" in err and expected in err
    assert "Traceback" not in err


def test_missing_data_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "data.path=nope/missing.txt",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "missing.txt" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "absent.yaml" in err


def test_unknown_key_in_file_lists_valid_keys(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 2\n  lrr: 0.1\n")
    code, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 2 and "c.yaml" in err and "train.lrr" in err and "batch_size" in err


def test_unknown_override_and_wrong_type(capsys):
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "model.hiden_size=8")
    assert code == 2 and "model.hiden_size" in err and "hidden_size" in err
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "train.epochs=many")
    assert code == 2 and "train.epochs" in err and "integer" in err


def test_resume_and_evaluate_need_a_run(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--resume", "--output-dir", str(tmp_path / "none"))
    assert code == 2 and "nothing to resume" in err
    code, err = run_cli(capsys, "evaluate", "--run", str(tmp_path / "none"))
    assert code == 2 and "no trained weights to evaluate" in err


def test_help_config_lists_required_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("data.path", "data.max_len", "data.shorten_seq_to", "model.name", "model.hidden_size",
                "model.num_layers", "train.epochs", "train.batch_size", "train.lr", "train.seed",
                "train.patience", "train.eval_every", "eval.ks", "eval.protocol"):
        assert key in out, key
