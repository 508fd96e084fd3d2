"""Data-parallel equivalence, measured: one process against two gloo ranks (CPU).

Runs tests/data_parallel_worker.py (tiny configs, dropout 0, 2 epochs) the way
tests/test_data_parallel.py does and prints, per case, the largest absolute and relative
difference of any loss term at any step and the validation metrics of both runs.

    python results/scale_out/measure_equivalence.py > results/scale_out/equivalence_raw.txt
"""

import datetime
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from test_data_parallel import CASES, _run_worker  # noqa: E402


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"# date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}  commit: {commit}  "
          f"machine: {platform.machine()}, CPU only")
    print(f"# cases: {' '.join(CASES)}; 2 epochs, global batch 32, 90 users, dropout 0")
    with tempfile.TemporaryDirectory() as tmp:
        one = _run_worker(Path(tmp) / "one", 1)
        two = _run_worker(Path(tmp) / "two", 2)
    print("| case (model:ZeRO stage) | steps | max abs diff | max rel diff | valid NDCG@20 1 rank | 2 ranks |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        a, b = one[case], two[case]
        pairs = [(x[k], y[k]) for x, y in zip(a["steps"], b["steps"], strict=True) for k in x]
        abs_diff = max(abs(x - y) for x, y in pairs)
        rel_diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
        ndcg = [round(m["NDCG@20"], 6) for m in a["valid"].values()], [round(m["NDCG@20"], 6)
                                                                      for m in b["valid"].values()]
        print(f"| {case} | {len(a['steps'])} | {abs_diff:.2e} | {rel_diff:.2e} | {ndcg[0]} | {ndcg[1]} |")


if __name__ == "__main__":
    main()
