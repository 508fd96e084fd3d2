"""curves.png: validation HR/NDCG and the training loss over epochs."""

from __future__ import annotations

from pathlib import Path

from .run_log import read_jsonl


def plot_curves(run_dir: Path, out_name: str = "curves.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "valid"]
    epochs = read_jsonl(run_dir / "epochs.jsonl")
    fig, (ax_rank, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k in (evals[0] if evals else {}) if k.startswith(("HR@", "NDCG@"))]
    cutoffs = sorted({int(k.split("@")[1]) for k in keys})
    for key in keys:
        # One colour per K: HR dashed, NDCG solid, so the pairs read together.
        color = f"C{cutoffs.index(int(key.split('@')[1]))}"
        ax_rank.plot([r["epoch"] for r in evals], [r[key] for r in evals], label=key, color=color,
                     linestyle="-" if key.startswith("NDCG") else "--")
    ax_rank.set(title="validation", xlabel="epoch", ylabel="metric")
    if evals:
        ax_rank.legend(fontsize=8)
    ax_loss.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], color="black")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    fig.tight_layout()
    out = run_dir / out_name
    tmp = out.with_name(f".{out_name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
