"""Bad input ends with one clear message (file, line, problem) and exit status 2, no traceback."""

import json
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


# -- a run folder holds one run ----------------------------------------------------------------

TINY_RUN = ["data.max_users=120", "model.hidden_size=16", "model.num_layers=1", "train.epochs=1",
            "train.batch_size=64"]


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_second_run_into_a_run_folder_is_refused_or_moves_the_old_run_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "--output-dir", str(run))[0] == 0
    before = (run / "metrics.jsonl").read_text()
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "train.seed=7",
                        "--output-dir", str(run))
    assert_one_line_error(code, err, str(run), "already holds a run", "--resume", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == before                # nothing appended
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "train.seed=7",
                        "--output-dir", str(run), "--overwrite")
    assert code == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_text() == before               # moved, not deleted
    assert [(r["epoch"], r["split"]) for r in rows(run / "metrics.jsonl")] == [(1, "valid"), (1, "test")]
    assert "seed: 7" in (run / "config.yaml").read_text()


def test_a_folder_without_run_files_is_accepted(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "--output-dir", str(run))[0] == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "metrics.jsonl").exists()


def test_the_default_run_folder_is_named_after_the_config_file(tmp_path, capsys, monkeypatch):
    import adarec.engine.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "run_training", lambda cfg, run_dir, **kw: seen.append(Path(run_dir)) or {})
    for name in ("adarec_beauty", "adarec_beauty_sparse5"):
        assert run_cli(capsys, "train", "--config", str(REPO / f"configs/{name}.yaml"))[0] == 0
    assert seen == [Path("runs/adarec_beauty"), Path("runs/adarec_beauty_sparse5")]


# -- clean errors, no run folder left behind -----------------------------------------------------

def assert_one_line_error(code, err, *fragments):
    """Exit 2 and one error line, the last thing printed (progress lines of the log may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("adarec: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, err)


def test_a_missing_data_file_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "data.path=nope/missing.txt",
                        "--output-dir", str(run))
    assert_one_line_error(code, err, "missing.txt")
    assert not run.exists()


def test_an_unknown_kernels_backend_in_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADAREC_KERNELS", "turbo")
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "--output-dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "ADAREC_KERNELS", "turbo", "auto, fused, eager")
    assert not (tmp_path / "r").exists()


def test_fused_kernels_on_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, "kernels.backend=fused",
                        "train.device=cpu", "--output-dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "kernels.backend=fused", "CUDA", "kernels.backend=auto")
    assert not (tmp_path / "r").exists()


def test_more_intent_clusters_than_training_users(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(REPO / "configs/elcrec_beauty.yaml"), "--set",
                        "data.max_users=40", "model.hidden_size=16", "model.num_intent_clusters=64",
                        "train.device=cpu", "--output-dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "model.num_intent_clusters=64", "has 40 training users")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overlay", [{"train_batch_size": 512}, {"train_micro_batch_size_per_gpu": 32},
                                     {"gradient_accumulation_steps": 2}])
def test_a_deepspeed_overlay_that_changes_the_batch(tmp_path, capsys, overlay):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(overlay))
    code, err = run_cli(capsys, "train", "--config", CONFIG, "--set", *TINY_RUN, f"train.ds_config={path}",
                        "--output-dir", str(tmp_path / "r"))
    (key,) = overlay
    assert_one_line_error(code, err, str(path), key, "train.batch_size=64")
    assert not (tmp_path / "r").exists()


def test_an_overlay_repeating_the_batch_keys_is_accepted(tmp_path):
    from adarec.engine.ds_config import build_ds_config

    from adarec.config import load_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": 1}))
    cfg = load_config(CONFIG, [*TINY_RUN, f"train.ds_config={path}"])
    import torch

    assert build_ds_config(cfg.train, 2, torch.device("cpu"))["train_micro_batch_size_per_gpu"] == 32
