"""PNG plots for the load tools (matplotlib, Agg backend: no display needed).

plot_run: one load run's latency over time and its histogram (`stress_test.py --plot FILE`).
plot_benchmark: bench/benchmark.py's report: throughput and p99 against concurrency for the service, the
in-process baseline and the raw model's ceiling, and the latency CDFs of its scenarios.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

COLOURS = {"service": "tab:blue", "baseline": "tab:orange", "raw": "tab:gray"}


def plot_run(results: list, path: Path, title: str) -> None:
    """Latency of each request against when it was sent (errors in red), and the latency histogram."""
    ok = [r for r in results if r.outcome == "200"]
    failed = [r for r in results if r.outcome != "200"]
    fig, (over_time, histogram) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    over_time.scatter([r.started for r in ok], [r.latency * 1000 for r in ok], s=6, label=f"200 ({len(ok)})")
    if failed:
        label = f"errors ({len(failed)})"
        over_time.scatter([r.started for r in failed], [r.latency * 1000 for r in failed], s=10, c="red", label=label)
    over_time.set(xlabel="sent at (s into the run)", ylabel="latency (ms)", title="latency over the run")
    over_time.legend(loc="upper left")
    over_time.grid(alpha=0.3)
    histogram.hist([r.latency * 1000 for r in ok] or [0], bins=40, color=COLOURS["service"])
    histogram.set(xlabel="latency (ms)", ylabel="requests", title="latency of the answered requests")
    histogram.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_benchmark(report: dict, path: Path) -> None:
    """Throughput and p99 against concurrent clients, and each scenario's latency CDF."""
    sweep = report["closed_loop"]
    clients = [level["clients"] for level in sweep]
    fig, (throughput, p99, cdf) = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    for system in ("service", "baseline"):
        colour = COLOURS[system]
        throughput.plot(
            clients, [lv[system]["throughput_per_s"] for lv in sweep], "o-", color=colour, label=report["names"][system]
        )
        p99.plot(clients, [lv[system]["latency_ms"]["p99"] for lv in sweep], "o-", color=colour, label=system)
    throughput.plot(clients, [lv["raw_ceiling_per_s"] for lv in sweep], "--", color=COLOURS["raw"], label="raw model")
    for axes, ylabel, title in (
        (throughput, "answers/s", "throughput (closed loop)"),
        (p99, "p99 latency (ms)", "p99 latency (closed loop)"),
    ):
        axes.set(xscale="log", xlabel="concurrent clients", ylabel=ylabel, title=title)
        axes.set_xticks(clients, [str(c) for c in clients])
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    for name, latencies in report["latency_samples_ms"].items():
        ordered = sorted(latencies)
        if ordered:
            style = "-" if name.startswith("service") else ":"
            cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style, label=name)
    cdf.set(xscale="log", xlabel="latency (ms)", ylabel="share of answered requests", title="latency CDF")
    cdf.grid(alpha=0.3, which="both")
    cdf.legend(fontsize="small")
    fig.suptitle(report.get("title", "benchmark"))
    fig.savefig(path, dpi=100)
    plt.close(fig)
