"""The benchmark suite and the load tools' analysis: pure functions, real plots, and one short real run."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support import ROOT

from bench import benchmark
from loadgen import Result, batch_sizes, time_split


def result(latency_ms: float, outcome="200", batch=None, **parts) -> Result:
    timing = {"batch": batch, **parts} if batch else dict(parts)
    return Result(0.0, latency_ms / 1000, outcome, timing)


def test_batches_by_size_count_batches_not_requests():
    runs = [result(90, batch=4)] * 8 + [result(40, batch=1)] * 3 + [result(5, "503"), result(80)]
    assert batch_sizes(runs) == {1: 3, 4: 2}  # 8 requests in batches of 4 = 2 batches; errors and untimed skipped
    several = [Result(0.0, 0.1, "200", {"batch": 8}, images=4)] * 6  # v2 requests of 4 images each
    assert batch_sizes(several) == {8: 3}  # 24 images in batches of 8


def test_time_split_is_the_mean_of_each_part_over_the_answered():
    parts = {"prepare": 2.0, "queue": 10.0, "inference": 60.0, "return": 1.0}
    runs = [result(80, batch=2, **parts), result(100, batch=2, **{**parts, "queue": 30.0}), result(9, "504", **parts)]
    assert time_split(runs) == {"prepare": 2.0, "queue": 20.0, "inference": 60.0, "return": 1.0}
    assert time_split([result(80, batch=1, inference=60.0)]) == {}  # an older worker: no split


def test_tune_variants_change_one_setting_each():
    assert benchmark.variants(["MAX_BATCH_WAIT_MS=0,10", "WEB_WORKERS=1"]) == [
        {"MAX_BATCH_WAIT_MS": "0"},
        {"MAX_BATCH_WAIT_MS": "10"},
        {"WEB_WORKERS": "1"},
    ]
    with pytest.raises(SystemExit):
        benchmark.variants(["BATCH_SIZE"])


def figures(throughput: float, p99: float, batches=None, inference=None) -> dict:
    return {
        "throughput_per_s": throughput,
        "latency_ms": {"p50": p99 / 2, "p95": p99, "p99": p99, "max": p99},
        "failed": {},
        "batches_by_size": batches or {},
        "time_split_ms": {"inference": inference} if inference else {},
    }


def synthetic_report(service_8: float, baseline_p99: float) -> dict:
    """Three rounds per concurrency whose median is the given figure and whose mean, first and last are not."""
    rounds = [
        {
            "clients": c,
            "raw_ceiling_per_s": 20.0,
            "service": figures(service_8 + offset, 900),
            "baseline": figures(15.0, baseline_p99 + p99_offset),
        }
        for c in (8, 32)
        for offset, p99_offset in ((-3.0, 900), (0.0, 0), (0.5, -400))
    ]
    return {
        "rounds": rounds,
        "one_client": {"fastest_batch1_ms": 50.0, "service": figures(15, 120)},  # p50 60 ms
        "open_loop": [{"load": 0.9, "service": figures(18, 350, batches={2: 40, 3: 10}, inference=120.0)}],
    }


def test_targets_are_judged_from_the_round_medians():
    met = benchmark.targets(synthetic_report(service_8=18.6, baseline_p99=1500))
    assert met["served_over_ceiling_8"] == {"figure": 0.93, "target": 0.85, "met": True}
    assert met["served_over_ceiling_32"] == {"figure": 0.93, "target": 0.85, "met": True}
    assert met["served_over_baseline_8"]["figure"] == 1.24 and met["served_over_baseline_8"]["met"]
    assert met["served_over_baseline_8"]["p99_ms"] == {"service": 900, "baseline": 1500}
    assert met["one_client_p50_ms"]["met"] and met["open_loop_90_p99_ms"]["met"]  # 60 <= 60; 350 <= 360
    assert "most often batch 2" in met["open_loop_90_p99_ms"]["target"]
    missed = benchmark.targets(synthetic_report(service_8=16.8, baseline_p99=800))
    assert not missed["served_over_ceiling_8"]["met"] and not missed["served_over_ceiling_32"]["met"]  # 0.84
    assert not missed["served_over_baseline_32"]["met"]  # faster (1.12 x) but a higher p99 than the baseline


def is_drawn_png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # lines and text, not a blank canvas
        return image.size


def test_plot_run_draws_latency_over_the_run_and_its_histogram(tmp_path):
    from bench.plots import plot_run

    runs = [Result(i * 0.05, 0.08 + (i % 7) / 100, "200") for i in range(200)] + [Result(3.0, 0.01, "503")]
    plot_run(runs, tmp_path / "run.png", "a run")
    width, height = is_drawn_png(tmp_path / "run.png")
    assert width > height


def test_plot_benchmark_draws_three_panels_from_a_report(tmp_path):
    from bench.plots import plot_benchmark

    sweep = [
        {
            "clients": c,
            "raw_ceiling_per_s": 20.0,
            "service": figures(min(19, 10 * c), 100 * c),
            "baseline": figures(15, 200 * c),
        }
        for c in (1, 2, 4, 8)
    ]
    report = {
        "names": {"service": "this service", "baseline": "in-process"},
        "closed_loop": sweep,
        "latency_samples_ms": {"service 8 clients": [80, 90, 120], "baseline 8 clients": [100, 400], "empty": []},
    }
    plot_benchmark(report, tmp_path / "b.png")
    width, height = is_drawn_png(tmp_path / "b.png")
    assert width > 2 * height


def test_the_one_client_figure_is_the_round_with_the_median_p50():
    runs = [{"latency_ms": {"p50": p50}, "round": i} for i, p50 in enumerate([41.8, 27.0, 28.5])]
    assert benchmark.median_round(runs)["round"] == 2
    assert benchmark.median_round(runs[:2])["round"] == 1  # an even count: the lower middle
    assert benchmark.median_round(runs[:1])["round"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~140 s on a 2-core Xeon; the model loads three times
def test_the_suite_runs_end_to_end_and_both_systems_give_the_models_own_answers(tmp_path):
    """A short real run: the seeded ResNet50 in the suite's process, the service and the baseline under gunicorn."""
    short = "--clients 1,4 --seconds 1.5 --raw-seconds 0.3 --open-seconds 2 --seed-seconds 2 --rounds 1 --single 4"
    argv = [sys.executable, "-m", "bench.benchmark", "--out", str(tmp_path), *short.split()]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=570)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["answers_agree"] == {"service": True, "baseline": True}
    keras = report["machine"]["runtime"].startswith("keras")
    calls = ("predict_on_batch", "predict") if keras else ("predict_on_batch",)
    assert set(report["call_paths"]) == {f"{c}@{b}" for c in calls for b in (1, 8, 32)}
    assert [level["clients"] for level in report["closed_loop"]] == [1, 4]
    for level in [*report["closed_loop"], *report["rounds"]]:
        assert level["raw_ceiling_per_s"] > 0
        for system in ("service", "baseline"):
            assert level[system]["succeeded"] > 0 and level[system]["failed"] == {}, level
    assert all(level["baseline_1_thread"]["succeeded"] > 0 for level in report["rounds"])
    service_4 = report["closed_loop"][1]["service"]
    assert set(service_4["time_split_ms"]) == {"prepare", "queue", "inference", "return"}
    assert report["closed_loop"][1]["baseline"]["batches_by_size"] == {
        "1": report["closed_loop"][1]["baseline"]["succeeded"]
    }
    assert [level["load"] for level in report["open_loop"]] == [0.5, 0.9, 1.5]
    assert report["open_loop"][1]["offered_per_s"] == pytest.approx(0.9 * report["capacity_per_s"], abs=0.01)
    seed = report["seed_pattern"]
    assert seed["spacing_s"] == pytest.approx(1 / (0.25 * report["capacity_per_s"]), rel=1e-3)
    assert seed["service"]["sent"] == seed["requests"]
    one = report["one_client"]
    assert {name: len(runs) for name, runs in one["rounds"].items()} == {"service": 1, "baseline": 1}
    assert one["service"] == one["rounds"]["service"][0] and one["service"]["succeeded"] == 4
    assert set(report["targets"]) >= {"served_over_ceiling_8", "served_over_baseline_8", "one_client_p50_ms"}
    assert "targets (medians over the rounds)" in run.stdout
    is_drawn_png(tmp_path / "benchmark.png")


def test_the_shards_benchmark_runs_both_layouts_and_the_busiest_master_carries_less_with_three():
    result = subprocess.run(
        [sys.executable, "-m", "bench.shards", "--seconds", "2", "--rounds", "1", "--clients", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rounds = {}
    for line in result.stdout.splitlines():
        if line.startswith("round 1"):
            shards = int(line.split(", ")[1].split()[0])
            images_s = float(line.split(": ")[1].split()[0])
            busiest = max(float(ms) for ms in line.rsplit(": ", 1)[1].split(", "))
            rounds[shards] = (images_s, busiest, re.search(r"\b0 failed;", line) is not None)  # not "10 failed"
    assert set(rounds) == {1, 3} and all(images > 0 and ok for images, _, ok in rounds.values()), result.stdout
    assert rounds[3][1] < rounds[1][1], result.stdout  # the queue's Redis work spread over the masters


def test_the_path_ceiling_runs_the_stand_in_worker_behind_each_web_server_and_reports_cpu_per_process():
    """gunicorn and uWSGI, serial and pipelined workers, in turn (--servers, --depths), each measured:
    images/s, no failure, and every process's CPU; with gunicorn, each request shape (--requests) too."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.path_ceiling", "--seconds", "2", "--clients", "4", "--depths", "1,3",
         "--servers", "gunicorn,uwsgi"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    turns = re.findall(r"^round 1, (\w+), PIPELINE_DEPTH (\d):$", result.stdout, re.M)
    assert sorted(turns) == [("gunicorn", "1"), ("gunicorn", "3"), ("uwsgi", "1"), ("uwsgi", "3")], result.stdout
    lines = [line for line in result.stdout.splitlines() if line.lstrip().startswith("4 clients, predict:")]
    assert len(lines) == 4, result.stdout
    shapes = subprocess.run(
        [sys.executable, "-m", "bench.path_ceiling", "--seconds", "2", "--clients", "4",
         "--requests", "predict,images:4,pixels:4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shapes.returncode == 0, shapes.stderr[-3000:]
    by_shape = re.findall(r"^ +4 clients, (\S+): ", shapes.stdout, re.M)
    assert by_shape == ["predict", "images:4", "pixels:4"], shapes.stdout
    lines += [line for line in shapes.stdout.splitlines() if line.lstrip().startswith("4 clients")]
    for line in lines:
        assert "failed 0" in line and float(line.split(": ")[1].split()[0]) > 0, result.stdout
        for process in ("web", "Redis", "worker (stand-in)", "load generator"):
            assert float(line.split(f" {process} ")[1].split(",")[0].split(";")[0]) > 0, line  # each one measured


@pytest.mark.slow
def test_the_path_ceiling_times_the_real_model_before_and_after_and_says_each_rate_as_a_multiple_of_it():
    """--model-seconds: ResNet50 timed in a process of its own before the round and after it; each line's
    multiple is its images/s over the ceiling timed before it."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.path_ceiling", "--seconds", "1", "--clients", "2", "--requests", "pixels:2",
         "--model-seconds", "0.3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    timed = re.findall(r"^model: batch 8 ([\d.]+), batch 16 ([\d.]+), batch 32 ([\d.]+) images/s$", result.stdout, re.M)
    assert len(timed) == 2 and all(float(rate) > 0 for rates in timed for rate in rates), result.stdout
    (line,) = re.findall(r"^ +2 clients, pixels:2: (\d+) images/s \(([\d.]+) x the model\)", result.stdout, re.M)
    ceiling = max(float(rate) for rate in timed[0])
    assert float(line[1]) == pytest.approx(int(line[0]) / ceiling, abs=0.1), result.stdout
    assert re.search(r"^model ceilings: [\d.]+, [\d.]+ images/s$", result.stdout, re.M), result.stdout


@pytest.mark.slow
def test_the_micro_benchmarks_jpeg_section_runs_and_reports_the_draft_speedup(tmp_path):
    """bench.micro --quick --only jpeg_draft: a section of the lab that nothing else runs (it broke once, silently)."""
    out = tmp_path / "micro.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.micro", "--quick", "--only", "jpeg_draft", "--only", "reply_wait",
         "--only", "claim", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    waits = json.loads(out.read_text())["reply_wait"]  # each way of receiving an answer measured
    assert set(waits) == {"per_request_wait_for", "listener_1_per_wake", "listener_8_per_wake", "listener_32_per_wake"}
    assert all(row["cpu_us_per_answer"] > 0 for row in waits.values()), waits
    takes = json.loads(out.read_text())["claim"]  # each take checked its count of messages while timed
    assert set(takes) == {"0_waiting", "1_waiting", "32_waiting", "changing_waiting"}
    assert all(v["wall_us"] > 0 for row in takes.values() for v in row.values()), takes
    rows = json.loads(out.read_text())["jpeg_draft"]
    assert rows["12mp"]["draft_decodes_at"] == [504, 378] and rows["12mp"]["speedup"] > 2
    assert rows["chelsea"]["mean_abs_pixel_difference"] == 0  # no scale below 1 covers 224: the same pixels


def test_the_worker_feed_benchmark_runs_serial_and_pipelined_workers_in_turn():
    """bench.worker_feed: the worker alone, the queue kept full, a stand-in model of fixed batch time; each depth
    measured (its figures are the benchmark's to judge, not this test's)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.worker_feed", "--batch-ms", "5", "--rounds", "1", "--seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("5 ")]
    assert [row[1] for row in rows] == ["1", "3"], result.stdout
    for row in rows:
        assert float(row[2]) > 0 and 0 < float(row[3]) <= 1.2 and float(row[4]) > 0, result.stdout


def test_the_chunked_read_benchmark_reads_each_body_whole_through_gunicorns_own_reader():
    """bench.chunked_read: every body, in every chunk size, read back byte for byte both ways (its own assert),
    through gunicorn's Body and ChunkedReader; the figures are the benchmark's to judge."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.chunked_read", "--n", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().endswith("ms")]
    assert [(row[0], row[1]) for row in rows] == [
        (f"{size:.2f}MB", f"{chunk}KB") for size in (0.07, 0.3, 3.6) for chunk in (16, 64, 1024)
    ], result.stdout
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows), result.stdout
