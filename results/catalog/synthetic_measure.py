"""The synthetic generator at a million items (docs/synthetic.md, "Measured"): reads a written
file back and scores the test's successor-count predictor against popularity (HR@10 on each
user's last item), with the same function the tests use.

    /usr/bin/time -f "wall %e s, maxrss %M KB" python -m adarec.data.synthetic --items 1000000 \
        --users 200000 --output FILE
    python results/catalog/synthetic_measure.py FILE
"""

import importlib.util
import sys
import time
from pathlib import Path

from adarec.data.io import read_sequences

TESTS = Path(__file__).resolve().parents[2] / "tests" / "test_synthetic.py"


def main(path: str) -> None:
    spec = importlib.util.spec_from_file_location("test_synthetic", TESTS)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    start = time.perf_counter()
    seqs = read_sequences(path)
    print(f"read_sequences: {time.perf_counter() - start:.2f} s, {len(seqs)} users, {seqs.num_items} items")
    popularity, successors = tests._hit_rates(seqs)
    print(f"HR@10 on the last item: popularity {popularity:.3f}, successor counts {successors:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
