"""The clients' pure parts: percentiles and the load summary."""

import math

from loadgen import Result, format_summary, percentile, summarize


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))


def test_summary_counts_failures_by_status_and_times_only_successes():
    results = [Result(0.0, 0.1, "200"), Result(0.5, 0.3, "200"), Result(1.0, 0.01, "503"), Result(1.0, 2.0, "504")]
    summary = summarize(results)
    assert summary["sent"] == 4 and summary["succeeded"] == 2
    assert summary["failed"] == {"503": 1, "504": 1}
    assert summary["wall_s"] == 3.0 and summary["throughput_per_s"] == round(2 / 3.0, 3)
    assert summary["latency_ms"]["p50"] == 100.0 and summary["latency_ms"]["max"] == 300.0
    assert "failed 2 (503: 1, 504: 1)" in format_summary(summary)


def test_server_timing_is_parsed_with_the_batch_size():
    from loadgen import parse_server_timing

    header = (
        'prepare;dur=3.1, wait;dur=80.5, queue;dur=6.0, inference;dur=70.2;desc="batch of 4", return;dur=4.3, '
        "total;dur=84.0"
    )
    assert parse_server_timing(header) == {
        "prepare": 3.1,
        "wait": 80.5,
        "queue": 6.0,
        "return": 4.3,
        "inference": 70.2,
        "batch": 4,
        "total": 84.0,
    }
    assert parse_server_timing("") == {}
