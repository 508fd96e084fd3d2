"""Serving a trained run: `adarec export`, `adarec recommend` and `Recommender` against brute force.

One real run is trained per module (SASRec on the first 300 users of the shipped Beauty file, one
epoch, ~10 s) and exported with the exact flat index. The references are computed here without
the serving code: each user's last max_len items padded by hand, the model's user_query against
item_table() rows 1..N, the history masked to -inf, torch.topk.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from adarec.engine.trainer import BEST_WEIGHTS, run_training

from adarec.cli import main
from adarec.config import load_config
from adarec.data.io import read_sequences
from adarec.errors import AdarecError
from adarec.faiss_index import default_nlist, to_search_device
from adarec.serving import Recommender, export_run

REPO = Path(__file__).resolve().parents[1]
USERS = 300
MAX_LEN = 50
TIE = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("serving") / "run"
    cfg = load_config(REPO / "configs/quickstart_beauty.yaml",
                      [f"data.max_users={USERS}", f"data.max_len={MAX_LEN}", "model.hidden_size=16",
                       "model.num_layers=1", "train.epochs=1", "train.batch_size=64", "train.device=cpu"])
    run_training(cfg, run)
    export_run(run, device="cpu")
    return run


@pytest.fixture(scope="module")
def recommender(run_dir):
    return Recommender.from_run(run_dir, device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def sequences():
    seqs = read_sequences(REPO / "data/Beauty.txt", max_users=USERS)
    return {int(uid): seqs.sequence(u).tolist() for u, uid in enumerate(seqs.user_ids)}


def copy_run(run_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


def exact_topk(model, num_items, history, k):
    """Brute force: scores of every item after `history`, its items excluded, best k (+1 for ties)."""
    last = history[-MAX_LEN:]
    inputs = torch.tensor([[0] * (MAX_LEN - len(last)) + last])
    with torch.no_grad():
        scores = (model.user_query(inputs) @ model.item_table()[1:num_items + 1].T)[0]
    scores[torch.tensor(history) - 1] = -torch.inf
    count = min(k + 1, num_items - len(set(history)))
    values, rows = torch.topk(scores, count)
    return (rows + 1).numpy(), values.numpy()


def assert_same_ranking(items, scores, ref_items, ref_scores, k):
    """Same length and scores; same ids wherever the exact score is not tied within TIE."""
    assert len(items) == min(k, len(ref_items))
    np.testing.assert_allclose(scores, ref_scores[:len(items)], atol=TIE, rtol=0)
    for j in range(len(items)):
        neighbours = ref_scores[max(j - 1, 0):j + 2]
        if np.sum(np.abs(neighbours - ref_scores[j]) <= TIE) == 1:       # only itself
            assert items[j] == ref_items[j], j


def test_export_writes_items_index_and_record(run_dir, recommender):
    n = recommender.num_items
    items = np.load(run_dir / "items.npy")
    # Rows 1..N of the trained embedding table, read straight from the saved weights.
    state = torch.load(run_dir / BEST_WEIGHTS, weights_only=True)["members"]["model"]["model"]
    np.testing.assert_array_equal(items, state["encoder.item_embeddings.weight"][1:n + 1].float().numpy())
    index = faiss.read_index(str(run_dir / "items.faiss"))
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == n == items.shape[0]
    record = json.loads((run_dir / "export.json").read_text())
    weights = run_dir / BEST_WEIGHTS
    assert record["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["weights"]["size"] == weights.stat().st_size
    assert (record["index"], record["num_items"], record["dim"], record["model"]) == ("flat", n, 16, "sasrec")
    assert record["faiss_version"] == faiss.__version__


def test_flat_top_k_equals_the_exact_top_k_for_every_user(recommender, sequences):
    model, n, k = recommender.served.model, recommender.num_items, 20
    users = list(sequences)
    results = recommender.recommend(users, k)
    for user, (items, scores) in zip(users, results, strict=True):
        ref_items, ref_scores = exact_topk(model, n, sequences[user], k)
        assert_same_ranking(items, scores, ref_items, ref_scores, k)


def test_history_items_are_never_returned(recommender, sequences):
    users = list(sequences)
    for user, (items, _) in zip(users, recommender.recommend(users, 200), strict=True):
        assert len(items) == 200 and len(set(items.tolist())) == 200
        assert not set(items.tolist()) & set(sequences[user])


def test_k_beyond_the_remaining_items_returns_all_of_them_best_first(recommender, sequences):
    n = recommender.num_items
    users = list(sequences)[:3]
    for user, (items, scores) in zip(users, recommender.recommend(users, n + 5), strict=True):
        assert sorted(items.tolist()) == sorted(set(range(1, n + 1)) - set(sequences[user]))
        assert np.all(np.diff(scores) <= 0)


def test_new_histories_rank_like_the_users_own(recommender, sequences):
    users = list(sequences)[:40]
    own = recommender.recommend(users, 10)
    new = recommender.recommend_histories([sequences[u] for u in users], 10)
    for (items, scores), (new_items, new_scores) in zip(own, new, strict=True):
        np.testing.assert_array_equal(items, new_items)
        np.testing.assert_allclose(scores, new_scores, atol=TIE, rtol=0)


def test_ivf_probing_every_list_equals_flat(run_dir, recommender, sequences, tmp_path):
    run = copy_run(run_dir, tmp_path)
    record = export_run(run, index="ivf", nlist=12, nprobe=12, device="cpu")
    assert (record["index"], record["nlist"], record["nprobe"]) == ("ivf", 12, 12)
    ivf = Recommender.from_run(run, device="cpu")
    assert isinstance(ivf.index, faiss.IndexIVFFlat) and ivf.index.nprobe == 12
    users = list(sequences)[:100]
    for (items, scores), (ref_items, ref_scores) in zip(ivf.recommend(users, 20), recommender.recommend(users, 20),
                                                        strict=True):
        # The flat results are checked against brute force above; scores here are complete rows.
        assert_same_ranking(items, scores, ref_items, ref_scores, 20)


def test_ivf_defaults(run_dir, recommender, tmp_path):
    run = copy_run(run_dir, tmp_path)
    record = export_run(run, index="ivf", device="cpu")
    n = recommender.num_items
    assert record["nlist"] == round(4 * n ** 0.5) == default_nlist(n)
    assert 1 <= record["nprobe"] < record["nlist"]
    with pytest.raises(AdarecError, match="--nprobe must lie in 1..5"):
        export_run(run, index="ivf", nlist=5, nprobe=6, device="cpu")
    with pytest.raises(AdarecError, match="--index ivf only"):
        export_run(run, index="flat", nlist=5, device="cpu")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="the CPU branch")
def test_without_gpus_the_index_is_searched_where_it_is():
    index = faiss.IndexFlatIP(4)
    assert to_search_device(index) is index


def test_a_copied_run_with_the_same_weights_is_not_stale(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    os.utime(run / BEST_WEIGHTS, ns=(1, 1))                # a new time, the same bytes
    Recommender.from_run(run, device="cpu")


def test_cli_export_and_recommend_print_one_line_per_user(run_dir, recommender, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "export.json").unlink()
    cli = [sys.executable, "-m", "adarec"]
    done = subprocess.run([*cli, "export", "--run", str(run), "--device", "cpu"], capture_output=True, text=True,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["index"] == "flat"
    users = [int(u) for u in recommender.user_ids[[0, 7]]]
    done = subprocess.run([*cli, "recommend", "--run", str(run), "--user", str(users[0]), "--user", str(users[1]),
                           "--k", "5", "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = recommender.recommend(users, 5)
    assert len(lines) == 2
    for line, user, (items, scores) in zip(lines, users, expected, strict=True):
        head, *pairs = line.split()
        assert int(head) == user and len(pairs) == 5
        assert [int(p.split(":")[0]) for p in pairs] == items.tolist()
        np.testing.assert_allclose([float(p.split(":")[1]) for p in pairs], scores, rtol=1e-5)
    done = subprocess.run([*cli, "recommend", "--run", str(run), "--user", str(users[1]), "--k", "3", "--json",
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["user"] == users[1] and row["items"] == expected[1].items[:3].tolist()


def cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adarec: error: ") and err.count("\n") == 1, err
    return err


def test_unknown_user_and_bad_k_are_one_line_errors(run_dir, capsys):
    err = cli_error(capsys, "recommend", "--run", str(run_dir), "--user", "1", "--user", "987654", "--device", "cpu")
    assert "user 987654 is not in the run's data file" in err
    for k in ("0", "-3"):
        assert f"--k must be an integer >= 1, got {k}" in cli_error(capsys, "recommend", "--run", str(run_dir),
                                                                    "--user", "1", "--k", k)


@pytest.mark.parametrize("missing", ["items.faiss", "export.json"])
def test_a_missing_export_file_says_to_export(run_dir, tmp_path, capsys, missing):
    run = copy_run(run_dir, tmp_path)
    (run / missing).unlink()
    err = cli_error(capsys, "recommend", "--run", str(run), "--user", "1", "--device", "cpu")
    assert f"no export ({missing} is missing)" in err and f"adarec export --run {run}" in err


def test_new_weights_make_the_export_stale(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    saved = torch.load(run / BEST_WEIGHTS, weights_only=True)
    for tensor in saved["members"]["model"]["model"].values():
        if tensor.is_floating_point():
            tensor.add_(0.01)
    torch.save(saved, run / BEST_WEIGHTS)                  # as if training had found better weights
    err = cli_error(capsys, "recommend", "--run", str(run), "--user", "1", "--device", "cpu")
    assert "the export is stale (best_model.pt changed" in err and f"adarec export --run {run}" in err
    assert main(["export", "--run", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()
    Recommender.from_run(run, device="cpu")                 # fresh again


def test_a_run_without_weights_is_a_one_line_error(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / BEST_WEIGHTS).unlink()
    for command in (["export", "--run", str(run)], ["recommend", "--run", str(run), "--user", "1"]):
        assert f"no trained weights to {command[0].replace('recommend', 'serve')} ({BEST_WEIGHTS} is missing)" \
            in cli_error(capsys, *command)
    assert "(no such directory)" in cli_error(capsys, "export", "--run", str(tmp_path / "absent"))
