"""The benchmark harness (profiling/bench.py) and the NVTX ranges (profiling/nvtx.py) on CPU."""

import csv
import json
from pathlib import Path

import pytest
from adarec.engine.trainer import run_training
from adarec.profiling import bench, nvtx, opcount

from adarec.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_users=120", "model.hidden_size=16", "model.num_layers=1", "model.num_intent_clusters=4",
        "model.max_depth=2", "train.batch_size=32", "train.device=cpu", "train.precision=fp32",
        "eval.batch_size=64"]

COLUMNS = ("config", "model", "backend", "precision", "batch_size", "steps_per_epoch", "step_ms_median",
           "step_ms_min", "step_ms_max", "samples_per_s", "epoch_train_s", "valid_pass_s", "peak_mem_mib",
           "device", "torch", "triton", "date", "commit", "speedup_vs_eager")


def test_harness_runs_two_steps_and_writes_all_columns(tmp_path, monkeypatch):
    """The real training step runs; the clock is scripted so every derived column is checked
    against numbers worked out by hand: blocks of 2 steps take 0.2, 0.4 and 0.3 s."""
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    blocks = iter([9.9, 0.2, 0.4, 0.3])                 # warmup block first (ignored)
    run_block = bench._run_block
    monkeypatch.setattr(bench, "_run_block", lambda trainer, batches, count: (run_block(trainer, batches, count),
                                                                              next(blocks))[1])
    monkeypatch.setattr(bench, "_validation_seconds", lambda trainer, repeats: 1.5)
    out = tmp_path / "bench"
    rows = bench.main(["--config", str(REPO / "configs/adarec_beauty.yaml"), "--set", *TINY,
                       "--backends", "eager", "--warmup", "1", "--steps", "2", "--repeats", "3",
                       "--eval-repeats", "1", "--trace", "--trace-steps", "1", "--out", str(out)])
    assert len(rows) == 1 and rows[0]["backend"] == "eager" and rows[0]["model"] == "adarec"
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and set(COLUMNS) <= set(table[0])
    row = table[0]
    assert int(row["steps_per_epoch"]) == 4                 # 120 users, batch 32
    # Step times 100, 200 and 150 ms: median 150; 32 users per step; 4 steps per epoch.
    assert [float(row[k]) for k in ("step_ms_median", "step_ms_min", "step_ms_max")] == pytest.approx([150, 100, 200])
    assert float(row["samples_per_s"]) == pytest.approx(32 / 0.150)
    assert float(row["epoch_train_s"]) == pytest.approx(0.6)
    assert float(row["valid_pass_s"]) == 1.5 and row["peak_mem_mib"] == ""   # no CUDA memory on CPU
    header = (out / "bench.md").read_text().splitlines()[0]
    assert all(c in header for c in COLUMNS)
    assert (out / "bench.png").stat().st_size > 0
    trace = json.loads((out / "trace_eager.json").read_text())
    assert trace["traceEvents"]


def test_trace_summary_reduces_a_profile_to_per_step_counts(tmp_path, monkeypatch):
    """--trace-summary: the counts of the opcount rules per step, no syncs in the real step, and
    the same launch count as counting one step directly."""
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    out = tmp_path / "bench"
    # The level grid is what a GPU runs (on the CPU model.level_layout=auto picks the compact
    # layout, whose size is read on the host).
    config, overrides = str(REPO / "configs/adarec_beauty.yaml"), [*TINY, "model.level_layout=grid"]
    rows = bench.main(["--config", config, "--set", *overrides, "--backends", "eager", "--warmup", "1",
                       "--steps", "1", "--repeats", "1", "--eval-repeats", "0", "--trace-summary",
                       "--trace-steps", "1", "--out", str(out)])
    summary = json.loads((out / "trace_summary_eager.json").read_text())
    assert summary["syncs_per_step"] == 0 and summary["sync_ops"] == {}
    assert rows[0]["launches_per_step"] == summary["launches_per_step"]
    assert "kernels_per_step" not in summary          # CUDA-only counts are absent on the CPU
    # The third full batch of the bench against a step counted on its own (the launch count does
    # not depend on which batch it is, once the shape constants exist).
    direct = opcount.profile_trainer(opcount._build_trainer(config, [*overrides, "kernels.backend=eager"],
                                                            tmp_path / "direct"))
    assert summary["launches_per_step"] == direct["training step"].launches > 50


def test_graphs_backend_sets_cuda_graphs():
    assert "train.cuda_graphs=true" in bench.BACKEND_SETTINGS["graphs"]
    assert bench.BACKENDS == tuple(bench.BACKEND_SETTINGS)


def test_nvtx_is_a_shared_no_op_when_off():
    nvtx.enable(False)
    assert nvtx.phase("data") is nvtx.phase("backward")


def test_nvtx_ranges_on_cpu_cover_every_phase_of_an_adarec_run(tmp_path, monkeypatch):
    """profiling.nvtx=true: a real (tiny) run enters every phase range without error."""
    entered = []
    real_enable = nvtx.enable

    def recording_enable(on=True):
        real_enable(on)
        if on:
            annotate = nvtx._annotate

            def recording(name, **kw):
                entered.append(name)
                return annotate(name, **kw)

            nvtx._annotate = recording

    monkeypatch.setattr(nvtx, "enable", recording_enable)
    cfg = load_config(REPO / "configs/adarec_beauty.yaml", [*TINY, "train.epochs=1", "profiling.nvtx=true",
                                                            "kernels.backend=eager"])
    try:
        run_training(cfg, tmp_path / "run")
    finally:
        real_enable(False)
        nvtx._annotate = None
    expected = {"data", "forward", "controller", "trajectory", "experts", "fusion", "losses", "backward",
                "optimizer_step", "evaluation"}
    assert expected <= set(entered)


def test_ranking_precision_reports_bf16_ties(tmp_path, capsys):
    """profiling/ranking_precision.py on a one-epoch run: bf16-rounded scores tie the target with
    other candidates far more often than fp32 scores of the same bf16 network."""
    from adarec.profiling import ranking_precision

    cfg = load_config(REPO / "configs/sasrec_beauty.yaml", [*TINY, "train.epochs=1"])
    run_training(cfg, tmp_path / "run")
    assert ranking_precision.main(["--run", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"bf16", "fp32"}
    assert result["bf16"]["target_tied_frac"] > result["fp32"]["target_tied_frac"]
    assert 0.0 <= result["fp32"]["NDCG@20"] <= result["fp32"]["HR@20"] <= 1.0


def test_reverse_benchmark_times_the_last_row_path_against_the_all_rows_one(tmp_path):
    from adarec.profiling import bench_reverse

    rows = bench_reverse.main(["--batch", "3", "--repeats", "1", "--warmup", "0", "--models", "adrec",
                               "--device", "cpu", "--out", str(tmp_path)])
    assert [r["case"] for r in rows] == ["adrec, all rows every step (public code)", "adrec, last row only"]
    assert rows[0]["speedup_vs_first"] == 1.0
    assert rows[1]["speedup_vs_first"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert (tmp_path / "reverse.md").exists() and rows[1]["device"] == "cpu"


def test_catalog_benchmark_measures_each_implementation_and_skips_what_would_not_fit(tmp_path):
    from adarec.profiling import bench_catalog

    rows = bench_catalog.main(["--items", "300", "2000", "--rows", "64", "--users", "16", "--dim", "8",
                               "--repeats", "1", "--ce-item-chunk", "256", "--eval-item-chunk", "256",
                               "--device", "cpu", "--out", str(tmp_path)])
    cases = [(r["phase"], r["impl"], r["items"]) for r in rows]
    assert cases == [(phase, impl, n) for n in (300, 2000)
                     for phase, impl in (("ce step", "eager"), ("ce step", "chunked"),
                                         ("eval pass", "full"), ("eval pass", "chunked"))]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["peak_mib"] is not None for r in rows)
    assert (tmp_path / "catalog.md").exists() and (tmp_path / "catalog_memory.png").stat().st_size > 0
    # An eager case estimated above the memory limit is reported with what it would need.
    skipped = bench_catalog.run_case({"phase": "ce step", "impl": "eager", "items": 10**6, "rows": 12800},
                                     memory_limit_gib=8.0)
    assert skipped["status"].startswith("skipped: needs ~143.1 GiB")


def test_full_epoch_timing_and_padding_columns(tmp_path, monkeypatch):
    """--full-epoch times a whole epoch instead of projecting; the padding columns are the
    sampler's and the evaluator's shares of padding (untrimmed: all of max_len's padding)."""
    monkeypatch.delenv("ADAREC_KERNELS", raising=False)
    out = tmp_path / "bench"
    common = ["--config", str(REPO / "configs/sasrec_beauty.yaml"), "--backends", "auto", "--warmup", "0",
              "--steps", "1", "--repeats", "1", "--eval-repeats", "0"]
    (row,) = bench.main([*common, "--set", *TINY, "--full-epoch", "--out", str(out)])
    assert row["epoch_measured"] is True and row["epoch_train_s"] > 0
    (plain,) = bench.main([*common, "--set", *TINY, "data.width_buckets=null", "data.group_by_length=false",
                           "--out", str(tmp_path / "plain")])
    assert plain["epoch_measured"] is False
    assert 0 < row["padding_frac"] < plain["padding_frac"] < 1
    assert 0 < row["valid_padding_frac"] < plain["valid_padding_frac"] < 1


def test_trimming_table_compares_layouts_and_takes_later_folders_first(tmp_path):
    from adarec.profiling import trimming_table

    def write(folder, name, epoch_s, padding):
        (tmp_path / folder / name).mkdir(parents=True)
        row = {"epoch_train_s": epoch_s, "valid_pass_s": 1.0, "padding_frac": padding, "step_ms_median": 10.0}
        (tmp_path / folder / name / "bench.json").write_text(json.dumps([row]))

    write("first", "sasrec_fp32_before", 30.0, 0.9)
    write("first", "sasrec_fp32_after", 20.0, 0.5)
    write("second", "sasrec_fp32_after", 10.0, 0.3)
    write("first", "diffurec_fp32_after", 40.0, 0.8)                 # one layout: before = after
    rows = {}
    for folder in ("first", "second"):
        rows.update(trimming_table.load(tmp_path / folder))
    lines = trimming_table.table(rows).splitlines()
    assert "| sasrec | fp32 | 30.0 | 10.0 | 3.00x |" in lines[3]
    assert "| diffurec | fp32 | 40.0 | 40.0 | 1.00x |" in lines[2]


def test_flop_count_reports_the_epoch_and_a_floor_below_it():
    from adarec.profiling import flop_count

    row = flop_count.main(["--config", str(REPO / "configs/sasrec_beauty.yaml"), "--steps", "2",
                           "--set", *TINY, "train.batch_size=16"])
    assert row["steps_per_epoch"] == 8                      # 120 users, batch 16
    assert 0 < row["epoch_tflop_floor"] < row["epoch_tflop_computed"]
    assert 0 <= row["floor_padding_frac"] < row["padding_frac"] < 1
    assert row["floor_seconds"] == pytest.approx(row["epoch_tflop_floor"] * 1e12 / (143.0 * 1e9))
