"""A rank killed mid-epoch: the survivor stops within the collective timeout naming it, and
`--resume` from the last checkpoint ends with the metrics of an uninterrupted run.

The two gloo ranks are started here with RANK/WORLD_SIZE/MASTER_* (what a launcher sets): the
DeepSpeed launcher would kill the survivor as soon as one rank dies, hiding its message.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adarec.engine.distributed import free_port
from adarec.engine.rank_watch import (
    DONE,
    FAILED,
    LEFT,
    RUNNING,
    RankLost,
    RankWatch,
    describe_stopped,
    heartbeat_path,
    is_collective_failure,
    read_heartbeats,
    stopped_ranks,
    write_heartbeat,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20
# Dropout 0 and the same two ranks: an interrupted and resumed run repeats the uninterrupted one.
# 1000 users in global batches of 16: 63 steps, a few seconds an epoch, so the kill lands mid-epoch.
OVERRIDES = ["data.max_users=1000", "model.hidden_size=16", "model.num_layers=1", "model.hidden_dropout=0",
             "model.attn_dropout=0", "train.epochs=3", "train.batch_size=16", "train.num_threads=1",
             f"train.dist_timeout_s={TIMEOUT_S}"]


# -- the heartbeat logic, without processes ----------------------------------------------------
def _beats(tmp_path, world_size):
    return read_heartbeats(tmp_path, world_size)


def test_a_stale_heartbeat_names_its_rank(tmp_path):
    now = time.time()
    write_heartbeat(tmp_path, 0, RUNNING, now=now)
    write_heartbeat(tmp_path, 1, RUNNING, now=now - 30)
    beats = _beats(tmp_path, 2)
    # Another host: the pid cannot be checked, only the age of the heartbeat.
    stopped = stopped_ranks(beats, now, host="elsewhere", self_rank=0, stale_after_s=5)
    assert list(stopped) == [1] and "no heartbeat for 30 s" in stopped[1]
    assert stopped_ranks(beats, now, host="elsewhere", self_rank=0, stale_after_s=60) == {}


def test_rank_0_can_be_the_one_named(tmp_path):
    now = time.time()
    write_heartbeat(tmp_path, 0, RUNNING, now=now - 12)
    write_heartbeat(tmp_path, 1, RUNNING, now=now)
    write_heartbeat(tmp_path, 2, LEFT, now=now - 12)        # a survivor that already left is no cause
    beats = _beats(tmp_path, 3)
    stopped = stopped_ranks(beats, now, host="elsewhere", self_rank=1, stale_after_s=5)
    assert list(stopped) == [0]
    message = describe_stopped(1, beats, stopped, tmp_path, RuntimeError("Connection closed by peer"),
                               "Resume with --resume.")
    assert message.startswith("rank 1: the collective failed because rank 0 (pid ")
    assert message.endswith("stopping. Resume with --resume.")


def test_a_dead_process_on_this_host_is_named_at_once(tmp_path):
    now = time.time()
    host = socket.gethostname()
    write_heartbeat(tmp_path, 0, RUNNING, now=now)
    write_heartbeat(tmp_path, 1, RUNNING, now=now)         # fresh, but its process is gone
    beats = _beats(tmp_path, 2)
    stopped = stopped_ranks(beats, now, host=host, self_rank=0, is_alive=lambda pid: False)
    assert "is gone" in stopped[1]
    assert stopped_ranks(beats, now, host=host, self_rank=0, is_alive=lambda pid: True) == {}


def test_recorded_errors_finished_ranks_and_missing_files(tmp_path):
    now = time.time()
    write_heartbeat(tmp_path, 0, RUNNING, now=now)
    write_heartbeat(tmp_path, 1, FAILED, reason="TrainingDiverged: non-finite training loss", now=now)
    write_heartbeat(tmp_path, 2, DONE, now=now - 100)
    beats = _beats(tmp_path, 4)
    assert beats[3] is None
    stopped = stopped_ranks(beats, now, host="elsewhere", self_rank=0)
    assert stopped == {1: "stopped with an error: TrainingDiverged: non-finite training loss"}
    # No stopped rank, one without a heartbeat file: the message says why nobody is named.
    message = describe_stopped(0, beats, {}, tmp_path, RuntimeError("Timed out waiting 20000ms"), "Resume.")
    assert "no heartbeat from rank(s) 3" in message and "file system every node shares" in message
    assert "Timed out waiting 20000ms" in message


def test_collective_failures_are_told_from_program_errors():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms"))
    try:
        try:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")
        except RuntimeError as inner:
            raise ValueError("while saving") from inner
    except ValueError as wrapped:
        assert is_collective_failure(wrapped)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("bad value"))


def test_the_watch_beats_and_turns_a_failed_collective_into_rank_lost(tmp_path):
    folder = tmp_path / ".ranks"
    folder.mkdir()
    write_heartbeat(folder, 1, RUNNING, now=time.time() - 60)
    watch = RankWatch(tmp_path, rank=0, world_size=2, checkpoints=tmp_path / "checkpoints", interval_s=0.05,
                      stale_after_s=0.5, end_process=False)
    with pytest.raises(RankLost) as lost, watch:
        time.sleep(0.2)
        assert read_heartbeats(folder, 2)[0].state == RUNNING
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242")
    assert str(lost.value).startswith("rank 0: the collective failed because rank 1 (pid ")
    assert "No checkpoint was written yet" in str(lost.value)
    assert read_heartbeats(folder, 2)[0].state == LEFT
    # A rank's own error is recorded for the others and raised unchanged.
    with pytest.raises(ValueError), RankWatch(tmp_path, rank=1, world_size=2, checkpoints=tmp_path, end_process=False):
        raise ValueError("bad batch")
    assert read_heartbeats(folder, 2)[1].reason == "ValueError: bad batch"
    # One process: nothing to watch, no files.
    with RankWatch(tmp_path / "single", rank=0, world_size=1, checkpoints=tmp_path):
        pass
    assert not heartbeat_path(tmp_path / "single" / ".ranks", 0).exists()


# -- two real ranks ----------------------------------------------------------------------------

def _start_ranks(run: Path, args: list[str], logs: Path, label: str,
                 program: tuple[str, ...] = ("-m", "adarec.train")) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs / f"{label}.rank{rank}.log", "w") as out:     # the child keeps its own copy
            procs.append(subprocess.Popen([sys.executable, *program, *args, "--output-dir", str(run)],
                                          env=env, stdout=out, stderr=subprocess.STDOUT, cwd=logs))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill whatever is still running (a failed assertion must not leave ranks behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        _stop(procs)


def _committed(run: Path, tag: str) -> bool:
    return (run / "checkpoints" / "model" / tag / "manifest.json").exists()


def _log(logs: Path, label: str, rank: int) -> str:
    return (logs / f"{label}.rank{rank}.log").read_text()


# A group made after setup (as DeepSpeed makes its data-parallel group) whose peer never joins.
LATE_PEER = """
import os, sys, time, torch
from adarec.engine.distributed import setup_distributed
dist = setup_distributed("cpu", 3.0)
group = torch.distributed.new_group([0, 1])
if dist.rank == 1:
    time.sleep(60)
start = time.monotonic()
try:
    torch.distributed.all_reduce(torch.ones(1), group=group)
except RuntimeError:
    print(f"timed out after {time.monotonic() - start:.1f} s", flush=True)
    os._exit(0)
sys.exit(1)
"""


def test_groups_made_after_setup_time_out_with_the_configured_timeout(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", LATE_PEER], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=45)
    finally:
        _stop(procs)
    waited = re.search(r"timed out after ([0-9.]+) s", out)
    assert procs[0].returncode == 0 and waited, out
    assert float(waited.group(1)) < 10          # 3 s, not torch's default of 30 minutes


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc")
def test_a_killed_rank_is_named_and_resume_matches_an_uninterrupted_run(tmp_path):
    config = ["--config", str(REPO / "configs/sasrec_beauty.yaml"), "--set", *OVERRIDES]
    full, cut = tmp_path / "full", tmp_path / "cut"

    uninterrupted = _start_ranks(full, config, tmp_path, "full")
    ranks = _start_ranks(cut, config, tmp_path, "cut")
    try:
        deadline = time.monotonic() + 240
        while not _committed(cut, "epoch1"):
            assert time.monotonic() < deadline, _log(tmp_path, "cut", 0)[-3000:]
            assert all(p.poll() is None for p in ranks), _log(tmp_path, "cut", 0)[-3000:]
            time.sleep(0.05)
        time.sleep(0.1)                                     # into epoch 2's steps
        assert not _committed(cut, "epoch2"), "epoch 2 ended before the kill; the test needs longer epochs"
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        ranks[1].wait()
        status = ranks[0].wait(timeout=TIMEOUT_S + 30)
        stopped_after = time.monotonic() - killed_at
        out = _log(tmp_path, "cut", 0)
        assert status == 2, out[-3000:]
        assert stopped_after < TIMEOUT_S + 15
        assert f"rank 1 (pid {ranks[1].pid} on host " in out, out[-3000:]
        assert "Resume with --resume --output-dir" in out and "from checkpoint epoch1" in out
        assert "Traceback" not in out
        assert "rank 1 (pid" in (cut / "train.log").read_text()

        resumed_ranks = _finish(_start_ranks(cut, ["--resume"], tmp_path, "resumed"), timeout=240)
        assert resumed_ranks == [0, 0], _log(tmp_path, "resumed", 0)[-3000:]
        assert _finish(uninterrupted, timeout=240) == [0, 0], _log(tmp_path, "full", 0)[-3000:]
    finally:
        _stop(ranks + uninterrupted)
    expected = json.loads((full / "test_metrics.json").read_text())
    resumed = json.loads((cut / "test_metrics.json").read_text())
    assert resumed == pytest.approx(expected, abs=1e-6), (resumed, expected)


def test_a_heartbeat_left_by_an_earlier_attempt_is_not_read_as_this_ones(tmp_path):
    """A rank that died before reaching training after --resume left only its file of the earlier
    attempt: it is named as not having started, whatever state that old file records."""
    now = time.time()
    write_heartbeat(tmp_path, 0, RUNNING, now=now)
    write_heartbeat(tmp_path, 1, FAILED, reason="OSError: old failure", now=now - 600)
    beats = _beats(tmp_path, 2)
    stopped = stopped_ranks(beats, now, host="elsewhere", self_rank=0, stale_after_s=5, since=now - 2)
    assert list(stopped) == [1] and "earlier" in stopped[1] and "old failure" not in stopped[1]


def test_a_collective_called_wrongly_is_this_ranks_error_not_a_dead_peer():
    # What gloo raises for mismatched all_gather shapes: a bug of the program, to be raised as is.
    assert not is_collective_failure(RuntimeError("ProcessGroupGloo::allgather: invalid tensor size at index 1"))


# rank 1's write of its RNG file for epoch 2 fails as on a full disk; the rest is `python -m adarec.train`.
FULL_DISK_ON_RANK_1 = """
import errno, os, sys
from pathlib import Path
import adarec.engine.trainer as trainer
real_save = trainer.atomic_torch_save
def save(path, obj):
    if os.environ["RANK"] == "1" and Path(path).parent.name == "epoch2" and Path(path).name.startswith("rng_rank"):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_save(path, obj)
trainer.atomic_torch_save = save
from adarec.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_write_failing_on_one_rank_stops_both_and_resume_falls_back(tmp_path):
    run = tmp_path / "run"
    config = ["--config", str(REPO / "configs/sasrec_beauty.yaml"), "--set", "data.max_users=200",
              "model.hidden_size=16", "model.num_layers=1", "model.hidden_dropout=0", "model.attn_dropout=0",
              "train.epochs=3", "train.batch_size=32", "train.num_threads=1", f"train.dist_timeout_s={TIMEOUT_S}"]
    procs = _start_ranks(run, config, tmp_path, "fail", program=("-c", FULL_DISK_ON_RANK_1))
    assert _finish(procs, timeout=TIMEOUT_S + 120) == [2, 2], _log(tmp_path, "fail", 0)[-3000:]
    failed, survivor = _log(tmp_path, "fail", 1), _log(tmp_path, "fail", 0)
    assert "checkpoint epoch2 could not be written" in failed and "No space left on device" in failed
    assert "the last good checkpoint epoch1 is kept" in failed
    assert "rank 1 (pid" in survivor and "stopped with an error" in survivor and "could not be written" in survivor
    assert "Traceback" not in failed + survivor
    assert _committed(run, "epoch1") and not _committed(run, "epoch2")

    resumed = _finish(_start_ranks(run, ["--resume"], tmp_path, "resumed"), timeout=180)
    out = _log(tmp_path, "resumed", 0)
    assert resumed == [0, 0], out[-3000:]
    assert "no manifest (incomplete save); falling back to epoch1" in out
    assert json.loads((run / "test_metrics.json").read_text())["split"] == "test"
