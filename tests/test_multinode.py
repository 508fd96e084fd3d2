"""The DeepSpeed launcher's multi-node path on one machine: two "nodes" of one gloo rank each,
started with `--no_ssh --node_rank i` (one launcher per node, as on a cluster without
passwordless ssh), give the same result as one node with two ranks."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from adarec.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--module", "adarec.train", "--config", str(REPO / "configs/sasrec_beauty.yaml"), "--set",
         "data.max_users=200", "model.hidden_size=16", "model.num_layers=1", "train.epochs=1", "train.batch_size=64",
         "train.num_threads=1"]



def _run_both(cmds: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the nodes wait for each other), then collect them all."""
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "test_metrics.json").read_text())


def _rows(run: Path, name: str) -> list[dict]:
    """The rows of a run log without their timings."""
    rows = [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]
    timings = ("time", "seconds", "step_ms", "samples_per_s")
    return [{k: v for k, v in row.items() if k not in timings} for row in rows]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_two_nodes_without_ssh_match_one_node_with_two_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    # Names only: with --no_ssh the launcher never contacts them; each line is one node's slots.
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = free_port()
    nodes = [["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
              "127.0.0.1", "--master_port", str(port), *TRAIN, "--output-dir", str(multi)] for node in (0, 1)]
    one_node = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *TRAIN, "--output-dir", str(single)]
    *node_runs, single_run = _run_both([*nodes, one_node], tmp_path)
    for node, proc in enumerate(node_runs):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout[-4000:]}"
        assert "nnodes=2, num_local_procs=1" in proc.stdout
        assert f"node_rank={node}" in proc.stdout
    assert single_run.returncode == 0, single_run.stdout[-4000:]

    # The same two ranks with the same rows, summed in the same order: the same numbers.
    assert _test_metrics(multi) == _test_metrics(single)
    assert _rows(multi, "metrics.jsonl") == _rows(single, "metrics.jsonl")
    assert _rows(multi, "epochs.jsonl") == _rows(single, "epochs.jsonl")      # the training loss
    assert "4 steps/epoch" in (multi / "train.log").read_text()   # 200 rows, 32 per rank per step
