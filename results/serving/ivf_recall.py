"""IVF against the exact flat index on a trained run: recall@20 and short rows per nprobe, and
the time of the model's queries and of a bare index search for all users (docs/serving.md).

    python results/serving/ivf_recall.py RUN_DIR      (exports RUN_DIR flat first)
"""

import sys
import time

import numpy as np

from adarec import faiss_index
from adarec.serving import Recommender, export_run
from adarec.serving.queries import padded_inputs

K = 20


def main(run: str) -> None:
    record = export_run(run, device="cpu")
    print(f"export flat: {record['seconds']} s")
    flat = Recommender.from_run(run, device="cpu")
    users = flat.user_ids.tolist()
    start = time.perf_counter()
    exact = flat.recommend(users, K)
    print(f"N={flat.num_items} users={len(users)} flat recommend {time.perf_counter() - start:.2f} s")
    items = flat.served.item_vectors()
    nlist = faiss_index.default_nlist(flat.num_items)
    print(f"nlist {nlist}, default nprobe {faiss_index.default_nprobe(nlist)}")
    ivf = faiss_index.build_index(items, "ivf", nlist, 1)
    for nprobe in sorted({1, 2, 4, 8, 16, 32, 64, faiss_index.default_nprobe(nlist), nlist}):
        ivf.nprobe = nprobe
        got = Recommender(flat.served, ivf, {}, 1024).recommend(users, K)
        recall = np.mean([len(set(a.items.tolist()) & set(b.items.tolist())) / len(b.items)
                          for a, b in zip(got, exact, strict=True)])
        short = np.mean([len(a.items) < K for a in got])
        print(f"nprobe={nprobe:4d} recall@{K}={recall:.4f} short_rows={short:.4f}")
    # Queries alone, then a bare search of k = 60 for all of them.
    served, seqs = flat.served, flat.served.sequences
    ends, lengths = seqs.offsets[1:], np.diff(seqs.offsets)
    start = time.perf_counter()
    queries = np.concatenate([served.queries(padded_inputs(seqs.items, ends[i:i + 1024], lengths[i:i + 1024],
                                                          served.keep, served.width))
                              for i in range(0, len(ends), 1024)])
    print(f"queries {queries.shape}: {time.perf_counter() - start:.2f} s")
    for name, index, nprobes in (("flat", faiss_index.build_index(items), (None,)), ("ivf", ivf, (8, 16, 55))):
        for nprobe in nprobes:
            if nprobe is not None:
                index.nprobe = nprobe
            start = time.perf_counter()
            index.search(queries, 60)
            print(f"{name} nprobe={nprobe} search k=60: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1])
