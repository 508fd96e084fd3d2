"""hierarchy.png: ADARec's per-level diagnostics over epochs (adarec/models/hierarchy_diagnostics.py).

Five panels from epochs.jsonl: L_deno per level, the distance of each level's view from E^0, the
mean router weight per level, the depth histogram, and the controller's entropy. Written when a
run ends (beside curves.png) and by `python -m adarec.engine.hierarchy_plot RUN_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from .curves import save_figure
from .run_log import current_rows, read_jsonl

PANELS = (("deno", "L_deno per level (1 = predicting eps = 0)"),
          ("dist", "||Ehat^k - E^0|| / ||E^0||"),
          ("router_g", "router weight g_k (fine expert share)"),
          ("depth_frac", "depth histogram (share of users)"))


def _levels(rows: list[dict], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}_(\d+)$")
    return sorted({int(m.group(1)) for r in rows for k in r if (m := pattern.match(k))})


def plot_hierarchy(run_dir: Path, out_name: str = "hierarchy.png") -> Path | None:
    """Draw the panels; None when the run logged no diagnostics (not ADARec) or matplotlib is missing."""
    run_dir = Path(run_dir)
    rows = current_rows(read_jsonl(run_dir / "epochs.jsonl"))
    if not _levels(rows, "dist"):
        return None
    try:
        import matplotlib
    except ImportError as exc:
        logging.getLogger("adarec.train").warning("no %s (%s; install matplotlib to draw it)",
                                                  out_name, exc)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4.2 * (len(PANELS) + 1), 3.6))
    epochs = [r["epoch"] for r in rows]
    for ax, (prefix, title) in zip(axes, PANELS, strict=False):
        levels = _levels(rows, prefix)
        cmap = plt.get_cmap("viridis", max(len(levels), 2))
        for i, level in enumerate(levels):
            values = [r.get(f"{prefix}_{level}") for r in rows]
            points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, color=cmap(i), label=f"k={level}")
        ax.set(title=title, xlabel="epoch")
        if levels:
            ax.legend(fontsize=6, ncol=2)
    ax = axes[-1]
    for key, label in (("controller_entropy", "controller entropy / log(T+1)"), ("expl", "L_expl (training)")):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set(title="depth controller", xlabel="epoch")
    ax.legend(fontsize=7)
    return save_figure(fig, run_dir / out_name, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarec.engine.hierarchy_plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    out = plot_hierarchy(args.run_dir)
    print(out if out is not None else f"{args.run_dir}: no hierarchy diagnostics in epochs.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
