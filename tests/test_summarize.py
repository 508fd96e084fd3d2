"""`adarec summarize` on synthetic run folders (seed folding against numpy, unfinished runs, old
rows, markdown and CSV, errors through the CLI) and on committed runs; RESULTS.md's generated
tables equal what the tool regenerates from the committed logs."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from adarec.cli import main
from adarec.summarize import load_runs, table, update_text

REPO = Path(__file__).resolve().parents[1]
KS = (5, 20)


def metrics_row(rng, mrr=True):
    row = {}
    for kind in ("HR", "NDCG", "MRR") if mrr else ("HR", "NDCG"):
        for k in KS:
            row[f"{kind}@{k}"] = float(rng.uniform(0.01, 0.2))
    return row


def make_run(root, name, *, seed=42, lr=0.001, valid=(0.01, 0.03, 0.02), test=True, select="NDCG@20",
             mrr=True, rng_seed=None, extra_rows=(), trained_epochs=True, data=None):
    """A run folder as adarec train writes it: config.yaml, metrics.jsonl, epochs.jsonl.
    valid: the select metric per epoch; the test row takes the best epoch (first of equal)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    config = {"data": data or {"path": "data/Beauty.txt", "max_len": 50, "shorten_seq_to": None, "max_users": None},
              "model": {"name": "sasrec", "hidden_size": 64},
              "train": {"epochs": len(valid), "lr": lr, "seed": seed},
              "eval": {"ks": list(KS), "protocol": "full", "select_metric": select}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(seed if rng_seed is None else rng_seed)
    rows = []
    key = select.upper()
    for epoch, value in enumerate(valid, 1):
        rows.append({"epoch": epoch, "split": "valid", **metrics_row(rng, mrr), key: value})
    best = 1 + int(np.argmax(valid))
    test_row = None
    if test:
        test_row = {"epoch": best, "split": "test", **metrics_row(rng, mrr)}
        if trained_epochs:
            test_row["trained_epochs"] = len(valid)
        rows.append(test_row)
    rows += list(extra_rows)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n"
                                              for e in range(1, len(valid) + 1)))
    return run, test_row


def md_rows(text):
    """The cells of a markdown pipe table, header first (the --- line dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def md_dicts(text):
    header, *rows = md_rows(text)
    return [dict(zip(header, row, strict=True)) for row in rows]


def short(value):
    text = f"{value:.4f}"
    return text[1:] if text.startswith("0.") else text


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_seeds_fold_into_mean_and_sample_std(tmp_path, capsys):
    tests = [make_run(tmp_path, f"s{seed}", seed=seed)[1] for seed in (42, 43, 44)]
    make_run(tmp_path, "other_lr", lr=0.002)                  # another config: its own row
    code, out, _ = run_cli(capsys, "summarize", "--format", "csv", *(tmp_path / n for n in ("s42", "s43", "s44")),
                           tmp_path / "other_lr")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["n"] for r in rows] == ["3", "1"]
    folded = rows[0]
    assert folded["seed"] == "42;43;44" and folded["run"] == "s42;s43;s44" and folded["status"] == "finished"
    for name in ("HR@5", "HR@20", "NDCG@5", "NDCG@20", "MRR@5", "MRR@20"):
        values = np.array([t[name] for t in tests])
        assert float(folded[name]) == pytest.approx(values.mean(), rel=1e-12), name
        assert float(folded[f"{name}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12), name
    assert folded["best_epoch"] == "2" and float(folded["valid_best"]) == pytest.approx(0.03)
    assert rows[1]["run"] == "other_lr" and rows[1]["HR@5_std"] == ""

    md = md_dicts(table([tmp_path / n for n in ("s42", "s43", "s44")]))
    assert len(md) == 1 and md[0]["n"] == "3" and md[0]["seed"] == "42, 43, 44"
    values = np.array([t["NDCG@20"] for t in tests])
    assert md[0]["NDCG@20"] == f"{short(values.mean())} ± {short(values.std(ddof=1))}"
    assert md[0]["valid NDCG@20"] == ".0300 ± .0000"


def test_no_fold_and_equal_seeds_stay_separate(tmp_path):
    a, _ = make_run(tmp_path, "a")
    b, _ = make_run(tmp_path, "b", rng_seed=7)                # same config, same seed: a rerun, not a seed
    c, _ = make_run(tmp_path, "c", seed=43)
    assert [r["n"] for r in md_dicts(table([a, b]))] == ["1", "1"]
    assert [r["n"] for r in md_dicts(table([a, c], fold=False))] == ["1", "1"]
    assert [r["n"] for r in md_dicts(table([a, c]))] == ["2"]


def test_unfinished_run_is_listed_and_never_folded(tmp_path):
    runs = [make_run(tmp_path, f"s{seed}", seed=seed)[0] for seed in (42, 43)]
    runs.append(make_run(tmp_path, "s44", seed=44, valid=(0.01, 0.02), test=False)[0])
    md = md_dicts(table(runs))
    assert [(r["run"], r["n"]) for r in md] == [("s42, s43", "2"), ("s44", "1")]
    unfinished = md[1]
    assert unfinished["epochs"] == "2, no test row" and unfinished["best epoch"] == "2"
    assert unfinished["valid NDCG@20"] == ".0200" and unfinished["HR@5"] == unfinished["MRR@20"] == ""
    rows = list(csv.DictReader(io.StringIO(table(runs, "csv"))))
    assert rows[1]["status"] == "no test row" and rows[1]["HR@5"] == ""


def test_select_metric_is_case_insensitive_and_the_first_best_wins(tmp_path):
    run, _ = make_run(tmp_path, "r", select="hr@5", valid=(0.1, 0.3, 0.3, 0.2))
    [row] = md_dicts(table([run]))
    assert row["valid HR@5"] == ".3000" and row["best epoch"] == "2" and row["epochs"] == "4"


def test_runs_with_other_select_metrics_name_theirs(tmp_path):
    a, _ = make_run(tmp_path, "a", select="HR@20")
    b, _ = make_run(tmp_path, "b", select="MRR@5", lr=0.1)
    rows = md_dicts(table([a, b]))
    assert [r["best valid"] for r in rows] == ["HR@20 .0300", "MRR@5 .0300"]


def test_rows_without_mrr_leave_its_cells_empty(tmp_path):
    old, old_test = make_run(tmp_path, "old", mrr=False, trained_epochs=False)
    new, _ = make_run(tmp_path, "new", lr=0.01)
    rows = md_dicts(table([old, new]))
    assert list(rows[0])[6:12] == ["HR@5", "HR@20", "NDCG@5", "NDCG@20", "MRR@5", "MRR@20"]
    assert rows[0]["MRR@5"] == "" and rows[1]["MRR@5"] != ""
    assert rows[0]["HR@5"] == short(old_test["HR@5"])
    assert rows[0]["epochs"] == "3"                          # from epochs.jsonl: the test row has no trained_epochs
    # Folded runs show a metric only when every one of them has it.
    a, _ = make_run(tmp_path / "f", "a", mrr=False)
    b, _ = make_run(tmp_path / "f", "b", seed=43)
    [folded] = md_dicts(table([a, b]))
    assert folded["n"] == "2" and "MRR@5" not in folded and "±" in folded["HR@5"]
    [folded] = md_dicts(table([a, b], metrics="HR@5,MRR@5"))
    assert folded["MRR@5"] == "" and "±" in folded["HR@5"]


def test_resumed_runs_read_the_rows_in_force_and_offline_rows_are_separate(tmp_path):
    stale = {"epoch": 2, "split": "test", "HR@5": 0.9, "HR@20": 0.9, "NDCG@5": 0.9, "NDCG@20": 0.9,
             "trained_epochs": 2}
    resumed = {"event": "resumed", "epoch": 2, "superseded": [{"epoch": 2, "split": "test"}]}
    offline = {"epoch": 2, "split": "test", "HR@5": 0.5, "HR@20": 0.6, "NDCG@5": 0.1, "NDCG@20": 0.2,
               "source": "evaluate", "overrides": ["eval.protocol=unmasked"]}
    run = tmp_path / "r"
    make_run(tmp_path, "r", valid=(0.01, 0.03))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    valid, test = lines[:2], lines[2]
    (run / "metrics.jsonl").write_text("\n".join([*valid, json.dumps(stale), json.dumps(resumed), test,
                                                  json.dumps(offline)]) + "\n")
    [row] = md_dicts(table([run], metrics="HR@5"))
    assert row["HR@5"] == short(json.loads(test)["HR@5"])
    rows = md_dicts(table([run], metrics="HR@5,hr@20", offline=True))
    assert [r["evaluation"] for r in rows] == ["test", "offline eval.protocol=unmasked"]
    assert rows[1]["HR@20"] == ".6000" and rows[1]["run"] == "" and rows[1]["n"] == ""


def test_a_folder_of_runs_is_expanded_one_level(tmp_path):
    make_run(tmp_path / "group", "b")
    make_run(tmp_path / "group", "a", lr=0.5)
    (tmp_path / "group" / "notes").mkdir()
    runs = load_runs([tmp_path / "group"])
    assert [Path(r.label).name for r in runs] == ["a", "b"]
    assert [r["run"] for r in md_dicts(table([tmp_path / "group"]))] == ["a", "b"]


def test_data_column_names_the_file_and_its_subset(tmp_path):
    run, _ = make_run(tmp_path, "r", data={"path": "data/Toys.txt", "shorten_seq_to": 5, "max_users": 3000,
                                           "augmented_prefix": 0})
    assert md_dicts(table([run]))[0]["data"] == "Toys (shorten_seq_to=5, max_users=3000)"


def test_out_writes_the_file(tmp_path, capsys):
    run, _ = make_run(tmp_path, "r")
    out = tmp_path / "out" / "table.csv"
    code, printed, _ = run_cli(capsys, "summarize", run, "--format", "csv", "--out", out)
    assert code == 0 and printed == ""
    assert out.read_text() == table([run], "csv")
    assert [p.name for p in out.parent.iterdir()] == ["table.csv"]       # no temporary file left


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda d: None, "not a run folder (no such directory)"),
    (lambda d: d.mkdir(), "not a run folder (no config.yaml or metrics.jsonl, and no run folders in it)"),
    (lambda d: (d.mkdir(), (d / "config.yaml").write_text("model: {name: sasrec}\n")),
     "not a run folder (no metrics.jsonl)"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "not a run folder (no config.yaml)"),
    (lambda d: (d.mkdir(), (d / "config.yaml").write_text("model: {name: sasrec}\n"),
                (d / "metrics.jsonl").write_text('{"epoch": 1, "split": "valid"\n')),
     "metrics.jsonl:1: not a JSON row"),
])
def test_errors_are_one_line_naming_the_folder(tmp_path, capsys, setup, expected):
    folder = tmp_path / "notarun"
    setup(folder)
    code, out, err = run_cli(capsys, "summarize", folder)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("adarec: error: ") and "Traceback" not in err
    assert str(folder) in err and expected in err


def test_a_missing_select_metric_is_an_error(tmp_path, capsys):
    run, _ = make_run(tmp_path, "r", select="HR@10")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("HR@10", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "summarize", run)
    assert code == 2 and "has no HR@10" in err and str(run) in err


def test_bad_metrics_option_and_missing_arguments(tmp_path, capsys):
    run, _ = make_run(tmp_path, "r")
    code, _, err = run_cli(capsys, "summarize", run, "--metrics", "AUC@5")
    assert code == 2 and "--metrics" in err
    code, _, err = run_cli(capsys, "summarize")
    assert code == 2 and "RUN_DIR" in err


def test_update_regenerates_marked_blocks_and_keeps_the_prose(tmp_path, capsys):
    make_run(tmp_path / "runs", "a")
    make_run(tmp_path / "runs", "b", seed=43)
    doc = tmp_path / "RESULTS.md"
    prose = "# Results\n\nSome prose | with a pipe.\n\n"
    doc.write_text(f"{prose}<!-- summarize: runs/a runs/b --metrics HR@5 -->\n| stale |\n<!-- /summarize -->\n"
                   "\nafter\n<!-- summarize:\n  runs --no-fold --metrics NDCG@20\n-->\n<!-- /summarize -->\nend\n")
    code, out, _ = run_cli(capsys, "summarize", "--update", doc, "--check")
    assert code == 1 and "2 of 2 summarize blocks out of date (lines 5, 10)" in out
    code, out, _ = run_cli(capsys, "summarize", "--update", doc)
    assert code == 0 and "regenerated: lines 5, 10" in out
    text = doc.read_text()
    assert text.startswith(prose) and text.endswith("<!-- /summarize -->\nend\n") and "| stale |" not in text
    assert table([tmp_path / "runs/a", tmp_path / "runs/b"], metrics="HR@5") in text
    assert [r["n"] for r in md_dicts(text.split("after")[1])] == ["1", "1"]
    code, out, _ = run_cli(capsys, "summarize", "--update", doc, "--check")
    assert code == 0 and "all up to date" in out


@pytest.mark.parametrize(("block", "expected"), [
    ("<!-- summarize: nope -->\n<!-- /summarize -->\n", "RESULTS.md:2: nope: not a run folder"),
    ("<!-- summarize: runs/a\n", "RESULTS.md:2: a summarize block needs"),
    ("<!-- summarize: runs/a --bogus -->\n<!-- /summarize -->\n", "RESULTS.md:2: unrecognized arguments: --bogus"),
])
def test_update_errors_name_the_file_and_line(tmp_path, capsys, block, expected):
    make_run(tmp_path / "runs", "a")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("text\n" + block)
    code, _, err = run_cli(capsys, "summarize", "--update", doc)
    assert code == 2 and expected in err and err.count("\n") == 1


def test_committed_peer_run():
    """results/peers/sasrec_beauty_3k: the trainer's test row, not the offline unmasked one."""
    run = REPO / "results/peers/sasrec_beauty_3k"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test = next(r for r in rows if r["split"] == "test" and "source" not in r)
    [row] = list(csv.DictReader(io.StringIO(table([run], "csv"))))
    assert (row["model"], row["data"], row["epochs"], row["best_epoch"]) == ("sasrec", "Beauty (max_users=3000)",
                                                                             "50", "46")
    assert float(row["valid_best"]) == max(r["NDCG@20"] for r in rows if r["split"] == "valid")
    for key in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
        assert float(row[key]) == test[key]
    assert "MRR@20" not in row                                 # committed before MRR was logged
    own, unmasked = md_dicts(table([run], metrics="HR@20,NDCG@20", offline=True))
    assert (own["HR@20"], own["NDCG@20"]) == (".0280", ".0129")
    assert (unmasked["evaluation"], unmasked["HR@20"], unmasked["NDCG@20"]) == ("offline eval.protocol=unmasked",
                                                                             ".0270", ".0109")


def test_committed_seed_pairs_fold():
    trimming = REPO / "results/beauty/trimming"
    rows = md_dicts(table([trimming / "sasrec_beauty_e20_ungrouped", trimming / "sasrec_beauty_e20_ungrouped_seed43"],
                          metrics="NDCG@20"))
    assert [(r["seed"], r["n"], r["NDCG@20"]) for r in rows] == [("42, 43", "2", ".0646 ± .0012")]


def test_results_md_tables_are_what_the_tool_regenerates():
    """Every <!-- summarize --> block of RESULTS.md equals the table regenerated from the committed
    logs; after a change, regenerate with `adarec summarize --update RESULTS.md`."""
    path = REPO / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    assert text.count("<!-- summarize:") >= 5
    regenerated, changed = update_text(text, REPO, "RESULTS.md")
    assert changed == [], f"RESULTS.md blocks at lines {changed} are stale: run adarec summarize --update RESULTS.md"
    assert regenerated == text


def test_each_member_of_a_run_keeps_its_own_best_epoch(tmp_path, capsys):
    """adarec-dual's members are selected separately (valid/e5, valid/e10): the best epochs of
    both, and the mean of their best values, not the single best row over both."""
    run, _ = make_run(tmp_path, "dual", valid=(0.01,), test=False)
    rows = [{"epoch": 1, "split": "valid/e5", "NDCG@20": 0.02}, {"epoch": 1, "split": "valid/e10", "NDCG@20": 0.01},
            {"epoch": 2, "split": "valid/e5", "NDCG@20": 0.05}, {"epoch": 2, "split": "valid/e10", "NDCG@20": 0.02},
            {"epoch": 3, "split": "valid/e5", "NDCG@20": 0.03}, {"epoch": 3, "split": "valid/e10", "NDCG@20": 0.04},
            {"epoch": 3, "split": "test", "NDCG@20": 0.045, "trained_epochs": 3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run_cli(capsys, "summarize", run, "--metrics", "NDCG@20")
    assert code == 0
    (row,) = md_dicts(out)
    assert row["best epoch"] == "2/3" and row["valid NDCG@20"] == short((0.05 + 0.04) / 2)
