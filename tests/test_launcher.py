"""`deepspeed --num_gpus 2 --module adarec.train` on the CPU: two gloo ranks, one result."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_two_rank_launch_trains_and_evaluates_over_all_users(tmp_path):
    run = tmp_path / "ddp"
    cmd = ["deepspeed", "--num_gpus", "2", "--module", "adarec.train", "--config",
           str(REPO / "configs/sasrec_beauty.yaml"), "--set", "data.max_users=301", "model.hidden_size=16",
           "model.num_layers=1", "train.epochs=1", "train.batch_size=64", "train.num_threads=1",
           "--output-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    test = json.loads((run / "test_metrics.json").read_text())
    # 301 users split over two ranks and summed back: every metric is a multiple of 1/301.
    for key in ("HR@5", "HR@10", "HR@20"):
        assert abs(test[key] * 301 - round(test[key] * 301)) < 1e-6
    log = (run / "train.log").read_text()
    assert "5 steps/epoch" in log  # 301 rows padded to 151 per rank, 32 per rank per step
