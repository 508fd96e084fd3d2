"""The engine on CUDA: bf16 through DeepSpeed, evaluation on device (skipped without a GPU)."""

import math
from pathlib import Path

import pytest
from adarec.engine.trainer import run_training

from adarec.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["sasrec", "elcrec"])
def test_bf16_run_on_cuda(tmp_path, model):
    cfg = load_config(REPO / f"configs/{model}_beauty.yaml", [
        "data.max_users=2000", "train.epochs=2", "train.device=cuda", "train.precision=auto",
        "model.num_intent_clusters=32",
    ])
    result = run_training(cfg, tmp_path / model)
    ds = (tmp_path / model / "ds_config.json").read_text()
    assert '"enabled": true' in ds  # bf16 chosen automatically on CUDA
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith(("HR", "NDCG")))
    assert result["HR@20"] > 0
