"""Self-describing runs (run.json, the train.log header, TensorBoard hparams, `adarec --version`,
optional TensorBoard / matplotlib) and the Python API (adarec.train, adarec.load_run), on tiny
CPU runs of SASRec on a slice of Beauty."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adarec
from adarec.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/sasrec_beauty.yaml"
TINY = ["data.max_users=200", "data.min_user_items=3", "data.min_item_users=2", "model.hidden_size=16",
        "model.num_layers=1", "train.batch_size=32", "train.device=cpu", "train.precision=fp32",
        "train.num_threads=1"]
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ ")


def utc(text: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(text)
    assert moment.utcoffset() == datetime.timedelta(0), text
    return moment


def headers(log: str) -> list[tuple[str, dict]]:
    """(versions line, resolved config) of every run session logged in a train.log."""
    out, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if " adarec run: " in line:
            assert lines[i + 1].endswith("INFO config (resolved):")
            block = []
            for text in lines[i + 2:]:
                if TIMESTAMP.match(text):
                    break
                block.append(text)
            out.append((line, yaml.safe_load("\n".join(block))))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch through adarec.train, then resumed to two: (run_dir, first RunResult, second
    RunResult, run.json after the first session, config.yaml of the first session)."""
    run = tmp_path_factory.mktemp("api") / "run"
    first = adarec.train(str(CONFIG), [*TINY, "train.epochs=1"], output_dir=run)
    record = json.loads((run / "run.json").read_text())
    config = (run / "config.yaml").read_text()
    second = adarec.train(None, ["train.epochs=2"], output_dir=run, resume=True)
    return run, first, second, record, config


def test_run_json_describes_the_run(tiny_run):
    record = tiny_run[3]
    assert set(record["versions"]) == {"adarec", "torch", "triton", "deepspeed", "numpy", "faiss", "python"}
    assert record["versions"]["adarec"] == adarec.__version__
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    git = record["git"]
    assert set(git) == {"commit", "dirty", "source"} and record["commit"] == git["commit"]
    if git["source"] == "git":           # a checkout (an sdist or a container has none)
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
    assert record["device"]["device"] == "cpu" and record["device"]["device_name"]
    assert record["device"]["cuda"] == torch.version.cuda
    assert record["precision"] == "fp32" and record["world_size"] == 1
    assert record["argv"] == sys.argv
    assert record["status"] == "completed" and record["resumes"] == []
    assert utc(record["start_time"]) <= utc(record["end_time"])


def test_train_log_starts_with_the_versions_and_the_resolved_config(tiny_run):
    run, _, _, _, first_config = tiny_run
    log = (run / "train.log").read_text()
    versions = json.loads((run / "run.json").read_text())["versions"]
    line = ", ".join(f"{name} {versions[name] or 'not installed'}"
                     for name in ("adarec", "torch", "triton", "deepspeed", "numpy", "faiss", "python"))
    assert re.fullmatch(rf"{TIMESTAMP.pattern}new adarec run: {re.escape(line)}; commit .+", log.splitlines()[0])
    (first_line, first_cfg), (resume_line, resumed_cfg) = headers(log)
    assert "python " in first_line and "commit " in first_line and "resuming adarec run" in resume_line
    assert first_cfg == yaml.safe_load(first_config)
    assert resumed_cfg == config_to_dict(load_config(run / "config.yaml"))
    assert first_cfg["train"]["epochs"] == 1 and resumed_cfg["train"]["epochs"] == 2
    assert first_cfg["data"]["min_item_users"] == 2


def test_resume_keeps_the_start_and_appends_the_resume(tiny_run):
    run, _, _, before, _ = tiny_run
    after = json.loads((run / "run.json").read_text())
    assert after["start_time"] == before["start_time"] and after["argv"] == before["argv"]
    assert after["versions"] == before["versions"]
    assert len(after["resumes"]) == 1 and after["status"] == "completed"
    resume = after["resumes"][0]
    assert utc(before["end_time"]) <= utc(resume["time"]) <= utc(after["end_time"])
    assert resume["world_size"] == 1 and resume["device"]["device"] == "cpu" and "versions" not in resume


def test_tensorboard_has_an_hparams_entry(tiny_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tiny_run[0]
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.name"].string_value == "sasrec" and hparams["data.min_item_users"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"hparam/best_valid_NDCG@20", "hparam/test_NDCG@20", "hparam/test_HR@10"} <= metrics
    assert "hparam/test_NDCG@20" in acc.Tags()["scalars"]


def test_run_result_holds_the_best_validation_and_the_test_metrics(tiny_run):
    run, first, second, _, _ = tiny_run
    assert first.run_dir == run and first.best_epoch == 1
    test = json.loads((run / "test_metrics.json").read_text())
    assert second.test == {k: v for k, v in test.items() if "@" in k}
    assert second.best_epoch == test["epoch"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r.get("split") == "valid"]
    best = max(valid, key=lambda r: r["NDCG@20"])
    assert second.valid == {k: v for k, v in best.items() if "@" in k}


def test_load_run_scores_as_the_evaluate_path(tiny_run):
    """The API's scores for each user's sequence without its last item are the scores `adarec
    evaluate` ranks the test split by, and its top-20 gives the same HR@20."""
    from adarec.engine.offline import evaluate_run
    from adarec.engine.run_model import load_run as load_for_evaluation

    run = tiny_run[0]
    loaded = adarec.load_run(run, device="cpu")
    assert loaded.best_epoch == tiny_run[2].best_epoch and loaded.num_items == loaded.sequences.num_items
    seqs = loaded.sequences
    histories = [seqs.sequence(u)[:-1] for u in range(len(seqs))]
    scores = loaded.score(histories)
    assert scores.shape == (len(seqs), loaded.num_items + 1) and torch.isneginf(scores[:, 0]).all()

    evaluation = load_for_evaluation(run, "cpu")
    split = evaluation.split
    assert split.num_items == loaded.num_items
    with torch.no_grad():
        reference = evaluation.model.user_query(split.test_input) @ evaluation.model.item_table().T
    torch.testing.assert_close(scores[:, 1:], reference[:, 1:loaded.num_items + 1], rtol=1e-5, atol=1e-5)

    top = loaded.recommend(histories, k=20)
    hits = [int(seqs.sequence(u)[-1]) in set(top[u].items.tolist()) for u in range(len(seqs))]
    assert all(not set(t.items.tolist()) & set(h.tolist()) for t, h in zip(top, histories, strict=True))
    assert np.mean(hits) == pytest.approx(evaluate_run(run, "test", "cpu")["HR@20"], abs=1e-12)

    # A user of the data file: after the whole sequence, as serving recommends.
    user = int(seqs.user_ids[3])
    mine = loaded.recommend_users([user], k=5)[0]
    direct = loaded.recommend([loaded.history(user)], k=5)[0]
    assert mine.items.tolist() == direct.items.tolist() and len(mine.items) == 5
    torch.testing.assert_close(loaded.score_users(user), loaded.score([loaded.history(user)]))


def test_the_api_names_a_run_folder_it_cannot_use(tmp_path):
    from adarec.errors import AdarecError

    with pytest.raises(AdarecError, match="no such directory"):
        adarec.load_run(tmp_path / "absent")
    with pytest.raises(AdarecError, match="nothing to resume"):
        adarec.train(None, output_dir=tmp_path / "absent", resume=True)
    with pytest.raises(AdarecError, match="output_dir"):
        adarec.train(load_config(CONFIG))


def test_import_adarec_stays_cheap_and_the_train_module_stays_callable():
    code = ("import sys, adarec; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(adarec.train) and 'load_run' in dir(adarec); import adarec.train as m; "
            "assert callable(adarec.train) and callable(m.main); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_version_flag(capsys):
    from adarec.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"adarec {adarec.__version__}\n")
    assert f"torch {torch.__version__}" in out and "triton " in out and "deepspeed " in out
    proc = subprocess.run([sys.executable, "-m", "adarec", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == out


def test_without_tensorboard_and_matplotlib_a_run_warns_once_and_goes_on(tmp_path, monkeypatch):
    from adarec.engine.trainer import run_training

    # None in sys.modules: importing the module raises ImportError, as when it is not installed.
    for name in ("torch.utils.tensorboard", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    run = tmp_path / "bare"
    cfg = load_config(CONFIG, [*TINY, "train.epochs=1"])
    result = run_training(cfg, run)
    assert result["split"] == "test" and (run / "test_metrics.json").exists()
    assert not (run / "tensorboard").exists() and not (run / "curves.png").exists()
    log = (run / "train.log").read_text()
    assert len(re.findall(r"WARNING no TensorBoard events \(", log)) == 1
    assert len(re.findall(r"WARNING no curves\.png \(.*install matplotlib", log)) == 1
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_a_run_that_fails_is_recorded_as_failed(tmp_path, monkeypatch):
    from adarec.engine.trainer import Trainer, TrainingDiverged, run_training

    def diverge(self):
        raise TrainingDiverged("non-finite training loss at epoch 1, step 1; stopped.")

    monkeypatch.setattr(Trainer, "fit", diverge)
    run = tmp_path / "failed"
    with pytest.raises(TrainingDiverged):
        run_training(load_config(CONFIG, [*TINY, "train.epochs=1"]), run)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("TrainingDiverged: non-finite")
    assert record["end_time"] is not None


def test_a_one_epoch_figure_draws_markers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from adarec.engine import curves

    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "split": "valid", "HR@10": 0.1, "NDCG@10": 0.05, "HR@20": 0.2, "NDCG@20": 0.07}) + "\n")
    (tmp_path / "epochs.jsonl").write_text(json.dumps({"epoch": 1, "loss": 6.5}) + "\n")
    figures = []
    save = curves.save_figure

    def keep(fig, out, dpi):
        figures.append([[(line.get_marker(), len(line.get_xdata())) for line in ax.get_lines()] for ax in fig.axes])
        return save(fig, out, dpi)

    monkeypatch.setattr(curves, "save_figure", keep)
    assert curves.plot_curves(tmp_path) == tmp_path / "curves.png"
    ranking, loss = figures[0]
    assert len(ranking) == 4 and len(loss) == 1
    assert all(marker not in (None, "", "None", " ") and points == 1 for marker, points in ranking + loss)


def test_source_commit_without_a_checkout_or_git(tmp_path, monkeypatch):
    from adarec.engine.run_record import source_commit

    monkeypatch.delenv("ADAREC_COMMIT", raising=False)
    assert source_commit(tmp_path) == {"commit": None, "dirty": None, "source": None}
    monkeypatch.setenv("ADAREC_COMMIT", "v1.2-abc")
    assert source_commit(tmp_path) == {"commit": "v1.2-abc", "dirty": None, "source": "env"}
    monkeypatch.setenv("PATH", str(tmp_path))          # no git at all
    assert source_commit()["source"] == "env"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not on PATH")
def test_source_commit_is_the_commit_of_a_repository_tracking_the_sources(tmp_path, monkeypatch):
    """An installed copy inside some other repository (a virtual environment in a project) is not
    that repository's checkout: only a tracked __init__.py makes the commit the sources'."""
    from adarec.engine.run_record import source_commit

    monkeypatch.delenv("ADAREC_COMMIT", raising=False)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "notes.txt").write_text("x\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    package = tmp_path / "venv" / "adarec"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert source_commit(package)["commit"] is None              # untracked: not this repository's
    subprocess.run([*git, "add", "venv/adarec/__init__.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "two"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert source_commit(package) == {"commit": head, "dirty": False, "source": "git"}
    (tmp_path / "notes.txt").write_text("changed\n")
    assert source_commit(package)["dirty"] is True


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_cpu_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m adarec.train`: two gloo ranks from torchrun's RANK,
    WORLD_SIZE, LOCAL_RANK and MASTER_* variables; one run folder, one run.json."""
    run = tmp_path / "ddp"
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "adarec.train", "--config", str(CONFIG),
           "--set", "data.max_users=61", "model.hidden_size=16", "model.num_layers=1", "train.epochs=1",
           "train.batch_size=32", "train.num_threads=1", "train.device=cpu", "--output-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    test = json.loads((run / "test_metrics.json").read_text())
    for key in ("HR@5", "HR@10", "HR@20"):          # 61 users over two ranks, summed back
        assert abs(test[key] * 61 - round(test[key] * 61)) < 1e-6
    record = json.loads((run / "run.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "completed"
    assert record["argv"][0].endswith("train.py") and "--config" in record["argv"]
    assert len(headers((run / "train.log").read_text())) == 1        # rank 0 alone writes the log
