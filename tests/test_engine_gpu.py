"""The engine on CUDA: bf16 by autocast (one GPU's default) and through DeepSpeed's bf16 engine,
evaluation on device (skipped without a GPU)."""

import json
import math
from pathlib import Path

import pytest
from adarec.engine.trainer import run_training

from adarec.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["sasrec", "elcrec"])
@pytest.mark.parametrize("bf16_mode", ["auto", "deepspeed"])
def test_bf16_run_on_cuda(tmp_path, model, bf16_mode):
    cfg = load_config(REPO / f"configs/{model}_beauty.yaml", [
        "data.max_users=2000", "train.epochs=2", "train.device=cuda", "train.precision=auto",
        "model.num_intent_clusters=32", f"train.bf16_mode={bf16_mode}",
    ])
    result = run_training(cfg, tmp_path / model)
    ds = json.loads((tmp_path / model / "ds_config.json").read_text())
    # bf16 is chosen automatically on CUDA; on one GPU at ZeRO stage 0 auto runs it by autocast,
    # with DeepSpeed itself in fp32.
    assert ds["bf16"]["enabled"] is (bf16_mode == "deepspeed")
    log = (tmp_path / model / "train.log").read_text()
    assert "precision bf16 (" + ("autocast" if bf16_mode == "auto" else "DeepSpeed") in log
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith(("HR", "NDCG")))
    assert result["HR@20"] > 0
