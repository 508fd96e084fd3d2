"""Checkpoints that check themselves: manifests with checksums, the fallback of --resume past a
damaged epoch, a failed checkpoint write that keeps the last good one, and the output-directory
probe before training."""

import errno
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from adarec.engine import checkpoint as ckpt
from adarec.engine import manifest as manifest_module
from adarec.engine import output_dir
from adarec.engine.checkpoint import commit_tag, find_resume_point, prune_checkpoints
from adarec.engine.manifest import MANIFEST, manifest_problem, write_manifest
from adarec.engine.output_dir import SPACE_MARGIN_BYTES, checkpoint_bytes_estimate
from adarec.engine.run_log import current_rows
from adarec.engine.trainer import run_training

from adarec.cli import main
from adarec.config import apply_overrides, load_config
from adarec.errors import AdarecError

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.max_users=200", "model.hidden_size=16", "model.num_layers=1", "train.batch_size=64",
    "train.lr=5e-3", "train.log_every=2", "train.device=cpu", "train.precision=fp32",
]
MODEL_STATES = "mp_rank_00_model_states.pt"


def small_config(epochs: int):
    return load_config(REPO / "configs/sasrec_beauty.yaml", [*SMALL, f"train.epochs={epochs}"])


def saved_config(run: Path):
    return apply_overrides(load_config(run / "config.yaml"), [])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -- damage ---------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- manifests ------------------------------------------------------------------------------------
@pytest.fixture
def tag_dir(tmp_path):
    folder = tmp_path / "epoch1"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "rng_rank0.pt").write_bytes(b"rng" * 100)
    write_manifest(folder)
    return folder


def test_manifest_lists_every_file_and_verifies(tag_dir):
    (tag_dir / ".weights.pt.tmp123").write_bytes(b"left by an interrupted atomic write")
    write_manifest(tag_dir)
    files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["rng_rank0.pt", "weights.pt"]
    assert files["weights.pt"]["size"] == 256 * 40 and len(files["weights.pt"]["sha256"]) == 64
    assert manifest_problem(tag_dir) is None


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: truncate(d / "weights.pt"), r"weights\.pt: 5120 bytes, the manifest records 10240 \(file truncated"),
    (lambda d: flip_byte(d / "weights.pt"), r"weights\.pt: sha256 mismatch \(file corrupted or truncated\)"),
    (lambda d: (d / "rng_rank0.pt").unlink(), r"rng_rank0\.pt: missing \(listed in the manifest\)"),
    (lambda d: (d / MANIFEST).unlink(), r"epoch1: no manifest \(incomplete save\)"),
    (lambda d: (d / MANIFEST).write_text('{"files": {"weights.pt": '), r"manifest\.json: unreadable manifest"),
    (lambda d: (d / MANIFEST).write_text('{"files": {}}'), r"manifest\.json: lists no files"),
    (lambda d: shutil.rmtree(d), r"epoch1: missing"),
])
def test_manifest_detects_damage(tag_dir, damage, expected):
    damage(tag_dir)
    assert re.search(expected, manifest_problem(tag_dir))


def make_tag(ckpt_dir: Path, epoch: int, committed: bool = True) -> Path:
    folder = ckpt_dir / f"epoch{epoch}"
    folder.mkdir(parents=True)
    (folder / MODEL_STATES).write_bytes(f"weights of epoch {epoch}".encode())
    if committed:
        write_manifest(folder)
    return folder


def test_resume_point_is_the_newest_tag_that_verifies_for_every_member(tmp_path):
    e5, e10 = tmp_path / "e5", tmp_path / "e10"
    for epoch in (2, 9, 10, 11):
        make_tag(e5, epoch)
    for epoch in (2, 9, 10):
        make_tag(e10, epoch)
    flip_byte(e10 / "epoch10" / MODEL_STATES)
    point = find_resume_point([e5, e10])
    assert point.tag == "epoch9" and point.verified                     # by number: epoch10 > epoch9
    assert point.rejected == (f"{e10 / 'epoch11'}: missing",
                              f"{e10 / 'epoch10' / MODEL_STATES}: sha256 mismatch (file corrupted or truncated)")


def test_resume_point_without_any_good_tag_lists_every_problem(tmp_path):
    member = tmp_path / "model"
    make_tag(member, 1, committed=False)
    truncate(make_tag(member, 2) / MODEL_STATES)
    point = find_resume_point([member])
    assert point.tag is None and len(point.rejected) == 2
    assert find_resume_point([tmp_path / "absent"]) == ckpt.ResumePoint(None, verified=False)


def test_a_run_saved_before_manifests_resumes_its_latest_tag_unverified(tmp_path):
    member = tmp_path / "model"
    for epoch in (1, 2):
        make_tag(member, epoch, committed=False)
    (member / "latest").write_text("epoch2")
    assert find_resume_point([member]) == ckpt.ResumePoint("epoch2", verified=False)
    write_manifest(member / "epoch1")                   # a run with manifests never trusts `latest`
    assert find_resume_point([member]).tag == "epoch1"


def test_prune_keeps_two_committed_tags_and_removes_stale_folders(tmp_path):
    member = tmp_path / "model"
    for epoch in (1, 3, 4):
        make_tag(member, epoch)
    make_tag(member, 2, committed=False)                # an interrupted save
    make_tag(member, 6)                                 # left by an attempt resumed from an earlier tag
    make_tag(member, 5, committed=False)
    prune_checkpoints(member, "epoch4")
    assert sorted(p.name for p in member.iterdir()) == ["epoch3", "epoch4"]


def test_commit_prunes_nothing_when_a_manifest_cannot_be_written(tmp_path, monkeypatch):
    e5, e10 = tmp_path / "e5", tmp_path / "e10"
    for member in (e5, e10):
        make_tag(member, 1)
        make_tag(member, 2)
        make_tag(member, 3, committed=False)
    real_write = manifest_module.atomic_write_json

    def full_disk_for_e10(path, obj):
        if e10 in Path(path).parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, obj)

    monkeypatch.setattr(manifest_module, "atomic_write_json", full_disk_for_e10)
    with pytest.raises(OSError):
        commit_tag([e5, e10], "epoch3")
    assert all(manifest_problem(m / f"epoch{e}") is None for m in (e5, e10) for e in (1, 2))


def test_space_estimate_counts_weights_and_adam_moments_of_every_kept_tag():
    modules = [torch.nn.Linear(10, 10), torch.nn.Linear(4, 5)]         # 110 + 25 parameters
    # 12 bytes a parameter in 2 kept tags + the one being written, 4 for the best weights.
    assert checkpoint_bytes_estimate(modules, keep=2) == 135 * (12 * 3 + 4) + SPACE_MARGIN_BYTES


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted three-epoch run: its folder and its test metrics."""
    run = tmp_path_factory.mktemp("straight") / "run"
    return run, run_training(small_config(3), run)


def copy_run(straight, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    return run


def test_every_kept_epoch_is_committed_by_a_manifest(straight):
    member = straight[0] / "checkpoints" / "model"
    assert sorted(p.name for p in member.iterdir()) == ["epoch2", "epoch3", "latest"]
    for tag in ("epoch2", "epoch3"):
        assert manifest_problem(member / tag) is None
        assert set(json.loads((member / tag / MANIFEST).read_text())["files"]) == {MODEL_STATES, "rng_rank0.pt"}


@pytest.mark.parametrize(("damage", "problem"), [
    (truncate, "bytes, the manifest records"),
    (flip_byte, "sha256 mismatch (file corrupted or truncated)"),
])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(straight, tmp_path, damage, problem):
    run = copy_run(straight, tmp_path)
    damaged = run / "checkpoints/model/epoch3" / MODEL_STATES
    damage(damaged)
    resumed = run_training(saved_config(run), run, resume=True)
    warnings = [line for line in (run / "train.log").read_text().splitlines() if "falling back" in line]
    assert len(warnings) == 1
    assert f"checkpoint {damaged}: " in warnings[0] and problem in warnings[0]
    assert warnings[0].endswith("; falling back to epoch2")
    # Epoch 3 trained again from the epoch-2 checkpoint: the uninterrupted run's numbers exactly.
    assert resumed == straight[1]
    losses = [row["loss"] for row in current_rows(read_jsonl(run / "epochs.jsonl"))]
    assert losses == [row["loss"] for row in read_jsonl(straight[0] / "epochs.jsonl")]
    assert manifest_problem(run / "checkpoints/model/epoch3") is None          # written again


def test_resume_with_every_checkpoint_damaged_is_one_clear_error(straight, tmp_path, capsys):
    run = copy_run(straight, tmp_path)
    truncate(run / "checkpoints/model/epoch3" / MODEL_STATES)
    flip_byte(run / "checkpoints/model/epoch2/rng_rank0.pt")
    with pytest.raises(AdarecError, match="no checkpoint can be resumed") as caught:
        run_training(saved_config(run), run, resume=True)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{run / 'checkpoints/model/epoch3' / MODEL_STATES}: " in message
    assert f"{run / 'checkpoints/model/epoch2/rng_rank0.pt'}: sha256 mismatch" in message

    capsys.readouterr()
    code = main(["train", "--resume", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]                     # after the log lines on stderr
    assert last.startswith("adarec: error: ") and "no checkpoint can be resumed" in last and "epoch2" in last
    assert "Traceback" not in err


def test_a_checkpoint_without_manifest_that_does_not_load_is_a_clear_error(straight, tmp_path):
    """A run saved before manifests resumes DeepSpeed's `latest` tag unverified; if that does not
    load, the error names the checkpoint instead of a torch traceback."""
    run = copy_run(straight, tmp_path)
    for manifest in run.glob("checkpoints/model/epoch*/manifest.json"):
        manifest.unlink()
    truncate(run / "checkpoints/model/epoch3" / MODEL_STATES)
    with pytest.raises(AdarecError, match=r"checkpoint .*epoch3 could not be loaded: RuntimeError: "):
        run_training(saved_config(run), run, resume=True)


def test_a_run_saved_before_manifests_still_resumes(straight, tmp_path):
    run = copy_run(straight, tmp_path)
    for folder in run.glob("checkpoints/model/epoch*"):
        (folder / MANIFEST).unlink()
        (folder / "rng_rank0.pt").unlink()                 # the RNG state then comes from DeepSpeed's client state
    assert run_training(saved_config(run), run, resume=True) == straight[1]
    assert "saved without a manifest" in (run / "train.log").read_text()


def fail_second_save(monkeypatch, failure):
    """DeepSpeed's second checkpoint write leaves half a file and fails as `failure` says."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save
    calls = []

    def save(self, state_dict, path):
        calls.append(path)
        if len(calls) != 2:
            return real_save(self, state_dict, path)
        Path(path).write_bytes(b"half a checkpoint")
        failure(state_dict)

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)


def raise_enospc(state_dict):
    raise OSError(errno.ENOSPC, "No space left on device")


def save_to_full_device(state_dict):
    # A real short write: torch's zip writer turns it into a RuntimeError, not an OSError.
    torch.save(state_dict, "/dev/full")


@pytest.mark.parametrize("failure", [
    raise_enospc,
    pytest.param(save_to_full_device, marks=pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")),
])
def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, failure):
    run = tmp_path / "run"
    fail_second_save(monkeypatch, failure)
    with pytest.raises(AdarecError) as caught:
        run_training(small_config(2), run)
    message = str(caught.value)
    assert message.startswith(f"checkpoint epoch2 could not be written to {run / 'checkpoints'}: ")
    assert message.endswith("; the last good checkpoint epoch1 is kept")
    if failure is raise_enospc:
        assert "[Errno 28] No space left on device" in message
    else:
        assert "free there" in message
    member = run / "checkpoints/model"
    assert not (member / "epoch2").exists()                     # the partial folder is gone
    assert manifest_problem(member / "epoch1") is None

    monkeypatch.undo()
    run_training(saved_config(run), run, resume=True)
    assert sorted(p.name for p in member.glob("epoch*")) == ["epoch1", "epoch2"]


def test_a_two_member_run_falls_back_to_a_tag_every_member_can_load(tmp_path):
    small = ["data.max_users=100", "model.hidden_size=8", "model.num_layers=1", "model.num_intent_clusters=4",
             "train.batch_size=64", "train.device=cpu", "train.precision=fp32", "train.epochs=2"]
    run = tmp_path / "dual"
    result = run_training(load_config(REPO / "configs/adarec-dual_beauty.yaml", small), run)
    damaged = run / "checkpoints/e10/epoch2" / MODEL_STATES
    flip_byte(damaged)                                      # e5's epoch 2 is intact, but cannot be used alone
    assert run_training(saved_config(run), run, resume=True) == result
    assert f"checkpoint {damaged}: sha256 mismatch" in (run / "train.log").read_text()
    for member in ("e5", "e10"):
        assert sorted(p.name for p in (run / "checkpoints" / member).glob("epoch*")) == ["epoch1", "epoch2"]


# -- the output directory, before training -------------------------------------------------------
def test_an_output_dir_under_a_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(AdarecError, match=rf"output directory {re.escape(str(blocker))}/run is not writable: "
                                          r"\[Errno 20\] Not a directory$"):
        run_training(small_config(1), blocker / "run")
    code = main(["train", "--config", str(REPO / "configs/sasrec_beauty.yaml"), "--set", *SMALL,
                 "--output-dir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "Traceback" not in err


def test_an_unwritable_output_dir_fails_before_training(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(output_dir.tempfile, "mkstemp", refused)
    run = tmp_path / "run"
    with pytest.raises(AdarecError, match=rf"output directory {re.escape(str(run))} is not writable: "
                                          r"\[Errno 13\] Permission denied$"):
        run_training(small_config(1), run)
    assert not run.exists()                     # created by the run, removed when its setup failed


def test_too_little_free_space_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    run = tmp_path / "run"
    with pytest.raises(AdarecError, match=r"has 0\.0 MiB \(1000 bytes\) free, but the checkpoints need about "
                                          r"[\d.]+ MiB \((\d+) bytes") as caught:
        run_training(small_config(1), run)
    need = int(re.search(r"\((\d+) bytes:", str(caught.value)).group(1))
    assert need > SPACE_MARGIN_BYTES
    assert not (run / "checkpoints").exists() and not (run / "epochs.jsonl").exists()
