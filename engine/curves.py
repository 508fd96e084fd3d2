"""curves.png: validation HR/NDCG and the training loss over epochs."""

from __future__ import annotations

import logging
from pathlib import Path

from .run_log import current_rows, read_jsonl


def plot_curves(run_dir: Path, out_name: str = "curves.png") -> Path | None:
    """Draw the curves; None (with a warning) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as exc:
        logging.getLogger("adarec.train").warning("no %s (%s; install matplotlib to draw it)",
                                                  out_name, exc)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    evals = [r for r in current_rows(read_jsonl(run_dir / "metrics.jsonl")) if r["split"].startswith("valid")]
    epochs = current_rows(read_jsonl(run_dir / "epochs.jsonl"))
    fig, (ax_rank, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    splits = sorted({r["split"] for r in evals})
    keys = [k for k in (evals[0] if evals else {}) if k.startswith(("HR@", "NDCG@"))]
    if len(splits) > 1:
        keys = [k for k in keys if k.endswith("@20")] or keys  # one pair per member keeps it readable
    cutoffs = sorted({int(k.split("@")[1]) for k in keys})
    for si, split in enumerate(splits):
        rows = [r for r in evals if r["split"] == split]
        for key in keys:
            # One colour per K (or per member): HR dashed, NDCG solid, so the pairs read together.
            index = si if len(splits) > 1 else cutoffs.index(int(key.split("@")[1]))
            label = key if len(splits) == 1 else f"{split.split('/')[-1]} {key}"
            # Markers, so that a run of one evaluation (a single point) still shows.
            ax_rank.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label, color=f"C{index}",
                         linestyle="-" if key.startswith("NDCG") else "--", marker="o", markersize=3)
    ax_rank.set(title="validation", xlabel="epoch", ylabel="metric")
    if evals:
        ax_rank.legend(fontsize=8)
    ax_loss.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], color="black", marker="o", markersize=3)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    return save_figure(fig, run_dir / out_name, dpi=110)


def save_figure(fig, out: Path, dpi: int) -> Path:
    """Lay out, save and close a matplotlib figure; written under a temporary name and renamed, so
    a reader never sees a half-written image."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out
