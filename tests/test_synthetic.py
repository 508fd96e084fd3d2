"""The synthetic data generator: files the reader accepts, the lengths, popularity law and
sequential signal it promises (each measured from the written items, not the generator's
internals), byte-for-byte determinism, the sidecar, and one-line errors from the command line."""

import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from adarec.data.io import read_sequences
from adarec.data.synthetic import SyntheticSpec, generate, write, write_synthetic

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "adarec.data.synthetic"]


def cli(*args: str, wait: bool = True):
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return (*proc.communicate(timeout=120), proc.returncode) if wait else proc


def test_cli_file_reads_back_with_requested_shape_and_sidecar(tmp_path):
    out = tmp_path / "nested" / "syn.txt"
    stdout, stderr, code = cli("--items", "3000", "--users", "400", "--seed", "5", "--min-length", "4",
                               "--max-length", "15", "--mean-length", "8", "--output", str(out))
    assert code == 0, stderr
    seqs = read_sequences(out)
    assert len(seqs) == 400 and seqs.num_items == 3000
    assert seqs.user_ids.tolist() == list(range(1, 401))
    lengths = seqs.lengths()
    assert lengths.min() >= 4 and lengths.max() <= 15
    # Nothing but the file and its sidecar is left in the folder (the temp files were renamed).
    assert sorted(p.name for p in out.parent.iterdir()) == ["syn.txt", "syn.txt.json"]

    side = json.loads(Path(f"{out}.json").read_text())
    assert side["parameters"] == {"items": 3000, "users": 400, "seed": 5, "min_length": 4, "max_length": 15,
                                  "mean_length": 8.0, "zipf": 1.0, "follow": 0.7, "successors": 4}
    raw = out.read_bytes()
    assert side["sha256"] == hashlib.sha256(raw).hexdigest() and side["bytes"] == len(raw)
    assert side["users"] == 400 and side["items"] == 3000
    assert side["interactions"] == sum(len(line.split()) - 1 for line in raw.decode().splitlines())
    assert side["distinct_items"] == len(set(seqs.items.tolist()))
    assert (side["length_min"], side["length_max"]) == (lengths.min(), lengths.max())
    assert json.loads(stdout)["sha256"] == side["sha256"]

    # The command line writes exactly what the Python API writes for the same parameters.
    api = tmp_path / "api.txt"
    write_synthetic(api, SyntheticSpec(items=3000, users=400, seed=5, min_length=4, max_length=15, mean_length=8))
    assert api.read_bytes() == raw


def test_largest_id_appears_even_when_popularity_would_never_draw_it(tmp_path):
    # At zipf 3 the item of rank 10,000 has weight 1e-12: only the guarantee puts it in the file.
    path = tmp_path / "steep.txt"
    write(path, generate(10_000, 20, seed=1, zipf=3.0))
    seqs = read_sequences(path)
    assert seqs.num_items == 10_000 and len(seqs) == 20


def test_lengths_follow_the_shifted_geometric_law():
    seqs = generate(500, 4000, seed=2, mean_length=10, min_length=3, max_length=10_000)
    lengths = seqs.lengths()
    assert lengths.min() == 3
    # min - 1 + Geometric(p), p = 1 / (mean - min + 1) = 1/8: mean 10 and P(length == min) = p.
    assert abs(lengths.mean() - 10) < 0.5
    assert abs(np.mean(lengths == 3) - 1 / 8) < 0.02

    cut = generate(500, 2000, seed=2, mean_length=8, min_length=5, max_length=12).lengths()
    assert cut.min() == 5 and cut.max() == 12            # both bounds held and reached


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def file_bytes(name, seed):
        write(tmp_path / name, generate(800, 300, seed=seed))
        return (tmp_path / name).read_bytes()

    first = file_bytes("a.txt", 11)
    assert file_bytes("b.txt", 11) == first
    assert file_bytes("c.txt", 12) != first


def _rank_frequency(seqs) -> np.ndarray:
    counts = np.bincount(seqs.items)[1:]
    return np.sort(counts)[::-1]


@pytest.mark.parametrize("zipf", [0.6, 1.0])
def test_rank_frequency_slope_matches_the_exponent(zipf):
    # Over the 100 most frequent items (counts large enough that sorting noise is small), the
    # least-squares slope of log(count) against log(rank) estimates -zipf.
    freq = _rank_frequency(generate(2000, 3000, seed=4, zipf=zipf))[:100]
    slope = np.polyfit(np.log(np.arange(1, 101)), np.log(freq), 1)[0]
    assert abs(slope + zipf) < 0.15, slope


def test_popularity_is_heavy_tailed_and_not_id_order():
    seqs = generate(2000, 3000, seed=4, zipf=1.0)
    freq = _rank_frequency(seqs)
    assert freq[:20].sum() / freq.sum() > 0.25           # top 1% of items: uniform would hold 1%
    flat = _rank_frequency(generate(2000, 3000, seed=4, zipf=0.0))
    assert flat[:20].sum() / flat.sum() < 0.05
    # Popularity sits on a random permutation: an item's id says nothing about its count.
    counts = np.bincount(seqs.items, minlength=2001)[1:]
    assert abs(np.corrcoef(np.arange(1, 2001), counts)[0, 1]) < 0.1


def _hit_rates(seqs) -> tuple[float, float]:
    """HR@10 on each user's last item of (popularity, successor counts), both fitted on every
    user's items before the last one."""
    rows = [seqs.sequence(u).tolist() for u in range(len(seqs))]
    pop = Counter(i for r in rows for i in r[:-1])
    follows = defaultdict(Counter)
    for r in rows:
        for a, b in pairwise(r[:-1]):
            follows[a][b] += 1
    top_pop = [i for i, _ in sorted(pop.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    predicted: dict[int, list[int]] = {}                  # top 10 after an item, by count then popularity
    pop_hits = succ_hits = 0
    for r in rows:
        if r[-2] not in predicted:
            after = follows[r[-2]]
            ranked = sorted(after, key=lambda b: (-after[b], -pop[b], b))[:10]
            predicted[r[-2]] = ranked + [i for i in top_pop if i not in ranked][: 10 - len(ranked)]
        pop_hits += r[-1] in top_pop
        succ_hits += r[-1] in predicted[r[-2]]
    return pop_hits / len(rows), succ_hits / len(rows)


def test_next_item_is_learnable_beyond_popularity():
    pop, succ = _hit_rates(generate(2000, 3000, seed=3, follow=0.7))
    assert succ > pop + 0.25, (pop, succ)
    # Control: without successions, the same predictor has nothing beyond popularity to find.
    pop0, succ0 = _hit_rates(generate(2000, 3000, seed=3, follow=0.0))
    assert succ0 < pop0 + 0.05, (pop0, succ0)


BAD_ARGUMENTS = {
    "items_below_2": (["--items", "1", "--users", "3"], "--items"),
    "no_users": (["--items", "10", "--users", "0"], "--users"),
    "min_length_below_3": (["--items", "10", "--users", "3", "--min-length", "2"], "--min-length"),
    "max_below_min": (["--items", "10", "--users", "3", "--min-length", "5", "--max-length", "4"], "--max-length"),
    "mean_above_max": (["--items", "10", "--users", "3", "--mean-length", "50", "--max-length", "20"],
                       "--mean-length"),
    "follow_above_1": (["--items", "10", "--users", "3", "--follow", "1.5"], "--follow"),
    "follow_negative": (["--items", "10", "--users", "3", "--follow", "-0.1"], "--follow"),
    "not_an_integer": (["--items", "many", "--users", "3"], "--items"),
    "output_under_a_file": (["--items", "10", "--users", "3", "--output", "{tmp}/a_file/out.txt"], "a_file"),
    "output_is_a_folder": (["--items", "10", "--users", "3", "--output", "{tmp}"], "folder"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad command line, started at once (each process pays the package import)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("not a folder\n")
    procs = {}
    for name, (args, _) in BAD_ARGUMENTS.items():
        args = [a.format(tmp=tmp) for a in args]
        if "--output" not in args:
            args += ["--output", str(tmp / f"{name}.txt")]
        procs[name] = cli(*args, wait=False)
    results = {name: (*p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    return tmp, results


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_exit_2_with_one_line(bad_runs, case):
    tmp, results = bad_runs
    stdout, stderr, code = results[case]
    assert code == 2
    assert stderr.startswith("python -m adarec.data.synthetic: error: ")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert BAD_ARGUMENTS[case][1] in stderr
    assert stdout == ""
    assert not (tmp / f"{case}.txt").exists()
