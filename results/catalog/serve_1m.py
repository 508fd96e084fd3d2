"""Serving the one-epoch 1M-item synthetic run: flat against IVF export, time and recall@20.

    python results/catalog/serve_1m.py RUN_DIR RUN_DIR_IVF     (RUN_DIR already exported flat;
                                                               RUN_DIR_IVF a copy of it)
Output: results/catalog/serving_1m_cpu.txt.
"""

import sys
import time

import numpy as np

from adarec.serving import Recommender, export_run


def main(flat_dir: str, ivf_dir: str) -> None:
    start = time.perf_counter()
    export_run(ivf_dir, index="ivf")
    print(f"export ivf: {time.perf_counter() - start:.1f} s")
    flat, ivf = Recommender.from_run(flat_dir), Recommender.from_run(ivf_dir)
    users = flat.user_ids
    results = {}
    for name, recommender in (("flat", flat), ("ivf", ivf)):
        start = time.perf_counter()
        results[name] = recommender.recommend(users, k=20)
        print(f"{name}: recommend k=20 for {len(users)} users: {time.perf_counter() - start:.2f} s")
    recall = np.mean([len(np.intersect1d(a.items, b.items)) / 20
                      for a, b in zip(results["flat"], results["ivf"], strict=True)])
    print(f"ivf recall@20 vs flat: {recall:.3f}  (record: {ivf.record['nlist']} lists, nprobe {ivf.record['nprobe']})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
