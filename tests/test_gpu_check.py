"""The GPU device check (profiling/gpu_check.sh) in its dry run, and its summary extractor.

The script runs from a copy of the two files it needs, in a folder without .git, so these tests
also show that it never needs the repository's history. Its step list is read from the script
itself, so adding a step needs no change here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "profiling" / "gpu_check.sh"
EXTRACTOR = REPO / "profiling" / "check_summary.py"
FAKE = "kernels_fast=fail,bench_fusion=timeout"
STEP_LINE = re.compile(r"^step (\S+) (?:exit (\d+) seconds (\d+)(.*)|skipped \((.+)\))$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def load_extractor():
    """profiling/check_summary.py as a module, by path (it is also run as a plain script)."""
    spec = importlib.util.spec_from_file_location("check_summary", EXTRACTOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_summary = load_extractor()


def script_steps() -> list[tuple[str, int, str]]:
    """(name, timeout, command) of every step, from the table at the top of the script."""
    text = SCRIPT.read_text()
    table = re.search(r"^STEPS='\n(.*?)^'$", text, re.S | re.M)
    assert table, "the step table (STEPS='...') was not found in the script"
    steps = []
    for line in table.group(1).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, timeout, command = line.split(maxsplit=2)
            steps.append((name, int(timeout), command))
    return steps


def run_check(tmp: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the script from a copy without .git; return the process and its OUT folder."""
    tree = tmp / "tree"
    (tree / "profiling").mkdir(parents=True, exist_ok=True)
    for path in (SCRIPT, EXTRACTOR):
        shutil.copy(path, tree / "profiling" / path.name)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    out = tmp / "out"
    full_env = {**os.environ, "ADAREC_COMMIT": "testcommit", "PYTHON": sys.executable, "TMPDIR": str(work),
                "GIT_DIR": str(tmp / "no-such-git-dir"), **env}
    for name in ("ADAREC_CHECK_DRY_RUN", "ADAREC_CHECK_FAKE", "ADAREC_CHECK_BUDGET", "ADAREC_CHECK_ONLY"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(["bash", str(tree / "profiling" / "gpu_check.sh"), *args], cwd=tmp, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, out


def summary_steps(out: Path) -> list[re.Match]:
    """The step lines of OUT/summary.txt, parsed."""
    lines = (out / "summary.txt").read_text().splitlines()
    return [m for m in map(STEP_LINE.match, lines) if m]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run with a fake failure and a fake timeout: (process, OUT, seconds, tmp)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc, out = run_check(tmp, "out", "--dry-run", ADAREC_CHECK_FAKE=FAKE)
    return proc, out, time.monotonic() - start, tmp


def test_step_table_has_the_known_steps_and_fits_the_time_limit():
    steps = script_steps()
    names = [name for name, _, _ in steps]
    # What the check exists for comes first: versions, the native build, one correctness pass
    # per kernel, the whole-step benchmarks of adarec and adarec-dual; all of it within 4 minutes.
    assert names[:5] == ["environment", "install", "kernels_fast", "bench_adarec", "bench_adarec_dual"]
    assert sum(timeout for _, timeout, _ in steps[:5]) <= 240
    for name in ("gpu_tests", "bench_trajectory", "bench_fusion", "deepspeed_bf16", "zero_bf16", "bench_peers",
                 "convergence", "bench_catalog", "catalog_1m"):
        assert name in names
    assert len(set(names)) == len(names)
    # 8 minutes for the whole check: the timeouts together stay within the 450 s budget, with room
    # for the wheel install before the script and the kill grace of the last step.
    assert sum(timeout for _, timeout, _ in steps) <= 450


def test_fast_kernel_pass_covers_each_kernel_and_the_gpu_tests_skip_it():
    """kernels_fast: one GPU test per kernel family (bf16 trajectory at D=256, the fp32 RNG path,
    the Triton CE, the CUDA gated fusion); gpu_tests runs every other GPU test, the graph
    capture, Triton CE and bf16 trajectory files first, verbosely, with per-test timeouts."""
    steps = {name: command for name, _, command in script_steps()}
    fast = re.findall(r"tests/\S+::\S+", steps["kernels_fast"])
    assert {f.split("::")[0] for f in fast} == {"tests/test_trajectory_kernel.py", "tests/test_linear_ce.py",
                                                "tests/test_gated_fusion_op.py"}
    rest = steps["gpu_tests"]
    assert sorted(re.findall(r"--deselect (\S+)", rest)) == sorted(fast)
    files = re.findall(r"(tests/test_\w+\.py)(?:\s|$)", rest)
    assert files[:3] == ["tests/test_graphed_step.py", "tests/test_linear_ce.py", "tests/test_trajectory_kernel.py"]
    for command in (steps["kernels_fast"], rest):
        assert "ADAREC_TEST_TIMEOUT=" in command and "ADAREC_TB_AS_YOU_GO=1" in command and " -v " in command
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *fast],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert f"{len(fast)} tests collected" in listed.stdout, listed.stdout[-2000:]


def test_dry_run_writes_only_three_plain_files_quickly(dry_run):
    proc, out, seconds, tmp = dry_run
    assert proc.returncode == 0, proc.stderr
    entries = sorted(p.name for p in out.iterdir())
    assert entries == ["log.txt", "results.tgz", "summary.txt"]
    assert len(entries) <= 8
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    assert seconds < 25
    assert list((tmp / "work").iterdir()) == []  # the work folder is gone; results.tgz holds it


def test_summary_has_the_commit_and_every_step_in_order(dry_run):
    _, out, _, _ = dry_run
    text = (out / "summary.txt").read_text()
    assert "commit: testcommit" in text
    assert "dry_run: 1" in text
    assert "running:" not in text  # the check finished: no step is left marked as running
    found = summary_steps(out)
    assert [m.group(1) for m in found] == [name for name, _, _ in script_steps()]
    status = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in found}
    assert status["kernels_fast"][0] == 3
    assert status["bench_fusion"][0] == 124
    assert "timed out" in next(m.group(4) for m in found if m.group(1) == "bench_fusion")
    for name, (code, seconds) in status.items():
        if name not in ("kernels_fast", "bench_fusion"):
            assert code == 0, name
        assert seconds >= 0
    names = list(status)
    assert names.index("convergence") > names.index("bench_fusion")  # later steps still ran
    assert "fake failure" in text  # check_summary's last line of the failed step


def test_log_shows_every_planned_command(dry_run):
    _, out, _, _ = dry_run
    log = (out / "log.txt").read_text()
    assert "--backends eager fused autocast graphs" in log
    for name, _, command in script_steps():
        assert f"===== step {name} (timeout " in log
        shown = re.escape(command.replace("$PY", sys.executable)).replace(re.escape("$STEP_DIR"), r"[^\"\s]+")
        assert re.search(shown, log), f"{name}: planned command not in log.txt"
    assert "train --config configs/adarec_beauty.yaml --output-dir" in log


def test_results_archive_is_a_gzip_tar_with_one_folder_per_step(dry_run):
    _, out, _, _ = dry_run
    with tarfile.open(out / "results.tgz", "r:gz") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    for name, _, _ in script_steps():
        assert members[name].isdir(), name
        assert f"{name}/output.txt" in members
    assert (out / "results.tgz").stat().st_size < 16 * 2**20


def test_script_never_reads_git():
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\bgit\b|\.git\b", code)


def test_an_exhausted_budget_skips_steps_and_the_env_switch_is_a_dry_run(tmp_path):
    proc, out = run_check(tmp_path, "out", ADAREC_CHECK_DRY_RUN="1", ADAREC_CHECK_BUDGET="0")
    assert proc.returncode == 0, proc.stderr
    found = summary_steps(out)
    assert [m.group(1) for m in found] == [name for name, _, _ in script_steps()]
    assert {m.group(5) for m in found} == {"budget"}
    assert "dry_run: 1" in (out / "summary.txt").read_text()


def test_only_runs_the_named_steps(tmp_path):
    proc, out = run_check(tmp_path, "out", "--dry-run", ADAREC_CHECK_ONLY="environment bench_adarec")
    assert proc.returncode == 0, proc.stderr
    found = {m.group(1): m for m in summary_steps(out)}
    assert found["environment"].group(2) == "0" and found["bench_adarec"].group(2) == "0"
    assert found["install"].group(5) == "not selected"


@pytest.mark.parametrize(("args", "env"), [((), {}), (("out", "--bogus"), {}),
                                           (("out", "--dry-run"), {"ADAREC_CHECK_FAKE": "kernels=explode"})])
def test_usage_errors_exit_2(tmp_path, args, env):
    proc, _ = run_check(tmp_path, *args, **env)
    assert proc.returncode == 2
    assert proc.stderr


# -- check_summary.py -----------------------------------------------------------------------------


def step_dir(tmp_path: Path, output: str = "") -> Path:
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "output.txt").write_text(output)
    return folder


def test_bench_rows_give_times_speedups_and_trace_counts(tmp_path):
    folder = step_dir(tmp_path, "| table |\n")
    rows = [
        {"config": "adarec_beauty", "backend": "eager", "step_ms_median": 41.23456, "epoch_train_s": 3.6287,
         "valid_pass_s": 1.5, "speedup_vs_eager": 1.0, "device": "NVIDIA H100"},
        {"config": "adarec_beauty", "backend": "graphs", "step_ms_median": 20.5, "epoch_train_s": 1.804,
         "valid_pass_s": None, "speedup_vs_eager": 2.011, "kernels_per_step": 812, "syncs_per_step": 0,
         "gpu_busy_ms_per_step": 18.25},
    ]
    (folder / "bench.json").write_text(json.dumps(rows))
    lines = check_summary.extract(folder, 0)
    assert lines == [
        "backend=eager step_ms_median=41.23 epoch_train_s=3.629 valid_pass_s=1.5 speedup_vs_eager=1",
        "backend=graphs step_ms_median=20.5 epoch_train_s=1.804 speedup_vs_eager=2.011 kernels_per_step=812 "
        "syncs_per_step=0 gpu_busy_ms_per_step=18.25",
    ]


def test_kernel_benchmark_tables_print_numeric_columns_compactly(tmp_path):
    folder = step_dir(tmp_path)
    rows = [{"op": "trajectory", "backend": f"b{i}", "dtype": "bf16", "B": 256, "median_ms": 0.5 + i,
             "peak_mem_mib": None, "device": "H100", "ok": True} for i in range(8)]
    (folder / "trajectory_bf16_D256.json").write_text(json.dumps(rows))
    (folder / "trace_fused.json").write_text("{not a table")
    lines = check_summary.extract(folder, 0)
    assert lines[0] == "trajectory_bf16_D256: backend=b0 op=trajectory dtype=bf16 B=256 median_ms=0.5"
    assert len(lines) == check_summary.MAX_ROW_LINES
    assert lines[-1] == "more_rows=3"


def test_pytest_final_line_and_failed_tests(tmp_path):
    ok = step_dir(tmp_path, "....s\n3 passed, 1 skipped in 2.0s\n")
    assert check_summary.extract(ok, 0) == ["pytest=3 passed, 1 skipped in 2.0s"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "output.txt").write_text("F.\nFAILED tests/test_x.py::test_a - AssertionError\n"
                                    "========= 1 failed, 1 passed, 4 deselected in 3.21s =========\n")
    assert check_summary.extract(bad, 1) == [
        "pytest=1 failed, 1 passed, 4 deselected in 3.21s", "failed=tests/test_x.py::test_a",
        "last_line========== 1 failed, 1 passed, 4 deselected in 3.21s =========",
    ]


def test_training_run_gives_last_valid_and_test_rows_and_epoch_seconds(tmp_path):
    folder = step_dir(tmp_path, '{"best_epoch": 2}\n')
    run = folder / "run"
    run.mkdir()
    metrics = [{"epoch": e, "split": "valid", "HR@10": 0.01 * e, "NDCG@20": 0.005 * e} for e in (1, 2, 3)]
    metrics.append({"epoch": 2, "split": "test", "HR@10": 0.025, "NDCG@20": 0.0125, "trained_epochs": 3})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"epoch": 4, "spl')
    (run / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0, "seconds": 10.0 + e}) + "\n"
                                              for e in (1, 2, 3)))
    assert check_summary.extract(folder, 0) == [
        "split=valid epoch=3 HR@10=0.03 NDCG@20=0.015",
        "split=test epoch=2 HR@10=0.025 NDCG@20=0.0125 trained_epochs=3",
        "epoch_seconds=11,12,13",
    ]


def test_environment_versions_and_import_errors(tmp_path):
    folder = step_dir(tmp_path, "torch 2.11.0+cu130 cuda 13.0 triton 3.6.0 gpu NVIDIA H100 80GB HBM3\n"
                                "deepspeed 0.18.0\nfaiss IMPORT ERROR ModuleNotFoundError No module named 'faiss'\n")
    assert check_summary.extract(folder, 0) == [
        "torch=2.11.0+cu130 cuda=13.0 triton=3.6.0 gpu=NVIDIA_H100_80GB_HBM3", "import_error=faiss",
    ]


def test_unknown_step_gives_its_last_line(tmp_path):
    folder = step_dir(tmp_path, "building\rbuilding 50%\rbuilt\nSuccessfully installed adarec-0.1.0\n\n")
    assert check_summary.extract(folder, 0) == ["last_line=Successfully installed adarec-0.1.0"]


def test_corrupt_or_missing_inputs_never_crash(tmp_path, capsys):
    folder = step_dir(tmp_path, "Traceback (most recent call last):\nRuntimeError: CUDA error\n")
    (folder / "bench.json").write_text('[{"backend": "eager", "step_ms')
    lines = check_summary.extract(folder, 1)
    assert lines[0].startswith("parse_error=JSONDecodeError")
    assert lines[-1] == "last_line=RuntimeError: CUDA error"
    (folder / "bench.json").write_text('{"not": "a list"}')
    assert check_summary.extract(folder, 1)[0].startswith("parse_error=ValueError")
    assert check_summary.main([str(tmp_path / "missing"), "x", "not-a-number"]) == 0
    assert capsys.readouterr().out.startswith("parse_error=")
    proc = subprocess.run([sys.executable, str(EXTRACTOR), str(folder), "bench_adarec", "1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("parse_error=")
