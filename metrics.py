"""Every Prometheus metric of the service, and what GET /metrics serves: the one place for them.

Two kinds of numbers:

- Counted by each web process as it serves (prometheus-client): http_requests_total, predict_latency_seconds,
  predict_queue_wait_seconds, predict_inference_seconds (these three by model), predict_rejected_total,
  predict_timeouts_total. /predict and the v2 protocol's infer count alike.
  Under gunicorn each worker process writes them to its own file in PROMETHEUS_MULTIPROC_DIR (gunicorn_conf.py
  sets that up before the workers fork) and a scrape, whichever worker answers it, sums every process's files,
  those of exited workers too, so counters never go back. prometheus-client chooses this mode when it is
  first imported with PROMETHEUS_MULTIPROC_DIR set; without it (the development server, the tests' client, a
  single-process WSGI server) the numbers are this process's own. Apache mod_wsgi or uWSGI with several
  processes must set it too (an empty directory, emptied at each start), or each scrape sees one process.
- Read from Redis at scrape time (QueueCollector, one read-only round trip per model): queue_up, and by model
  queue_depth, queue_in_progress, queue_max, queue_draining, model_workers_live,
  model_worker_heartbeat_age_seconds, queue_requeued_messages_total, and the model_* counters that the model
  workers add to in Redis in the same step as each batch's answers. These describe the whole queue (every
  worker, on every machine), so every web instance reports the same values for them: scrape one, or
  aggregate with max(), never sum().

A scrape never fails because of Redis: queue_up is 0 then, and the Redis-read numbers are left out.
"""

import logging
import os

# prometheus-client takes PROMETHEUS_MULTIPROC_DIR's mere presence for multiprocess mode: set but empty (an
# env file's "PROMETHEUS_MULTIPROC_DIR=", the README's "empty" default) it wrote its files into the working
# directory and every scrape failed. Empty means unset.
if "PROMETHEUS_MULTIPROC_DIR" in os.environ and not os.environ["PROMETHEUS_MULTIPROC_DIR"]:
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from image_queue import ModelDirectory

log = logging.getLogger(__name__)

# The mode prometheus-client chose when it was imported (see above).
MULTIPROCESS = values.ValueClass is not values.MutexValue

# Seconds, from a fast GPU's batch (10 ms) to the longest REQUEST_TIMEOUT_S anyone should set (30 s).
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Methods counted by name; any other becomes "other", so that made-up methods cannot add label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

disable_created_metrics()  # no *_created series: multiprocess mode has none, and both modes should look alike

# This process's own metrics (single-process mode serves this registry; multiprocess mode reads the files).
REGISTRY = CollectorRegistry()
HTTP_REQUESTS = Counter(
    "http_requests_total",
    "Requests answered by the app, by route (path template; 'other' when none matched: 404, 405), method and status",
    ["endpoint", "method", "status"],
    registry=REGISTRY,
)
PREDICT_LATENCY = Histogram(
    "predict_latency_seconds",
    "Answered (200) /predict requests: arrival to answer, upload and preparation included",
    ["model"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
PREDICT_QUEUE_WAIT = Histogram(
    "predict_queue_wait_seconds",
    "Answered /predict requests: from queued to answered, less the model's time on the batch",
    ["model"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
PREDICT_INFERENCE = Histogram(
    "predict_inference_seconds",
    "Answered /predict requests: the model's time on the batch each was in",
    ["model"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
PREDICT_REJECTED = Counter(
    "predict_rejected_total",
    "/predict refused with 503 (queue_full, no_worker, redis, draining, busy, worker_503) or 429 (rate_limit)",
    ["reason"],
    registry=REGISTRY,
)
for reason in ("queue_full", "no_worker", "redis", "draining", "busy", "worker_503", "rate_limit"):
    PREDICT_REJECTED.labels(reason)  # each series exists from the start, at 0, for rate() and alerts
PREDICT_TIMEOUTS = Counter(
    "predict_timeouts_total", "/predict answered 504: no answer by the deadline", registry=REGISTRY
)


def count_request(route: str | None, method: str, status: int) -> None:
    HTTP_REQUESTS.labels(route or "other", method if method in METHODS else "other", str(status)).inc()


def observe_prediction(model: str, total_s: float, wait_s: float, inference_s: float) -> None:
    """An answered request: its whole time, its wait for the answer (of which inference_s was the model's)."""
    PREDICT_LATENCY.labels(model).observe(total_s)
    PREDICT_QUEUE_WAIT.labels(model).observe(max(0.0, wait_s - inference_s))
    PREDICT_INFERENCE.labels(model).observe(inference_s)


class QueueCollector:
    """Each model's queue and its workers' service-wide counters, read from Redis at each scrape."""

    def __init__(self, models: ModelDirectory):
        self.models = models

    def collect(self):
        up = GaugeMetricFamily("queue_up", "1 if Redis answered this scrape for every model, else 0")
        each, answered = {}, False
        try:
            for model in self.models.ids():
                queue = self.models.queue(model)
                each[model] = (queue, queue.stats())
            answered = True
        except Exception as exc:  # a scrape must not fail: queue_up 0 says Redis did not answer
            log.warning("/metrics: could not read the queue from Redis: %s", exc)
            each = {}
        up.add_metric([], int(answered))
        yield up
        families = {name: GaugeMetricFamily(name, text, labels=["model"]) for name, text in GAUGES.items()}
        families |= {name: CounterMetricFamily(name, text, labels=["model"]) for name, text in COUNTERS.items()}
        ages = GaugeMetricFamily(
            "model_worker_heartbeat_age_seconds",
            "Seconds since each registered model worker's last heartbeat (a dead one until a peer requeues its work)",
            labels=["model", "worker"],
        )
        depth = GaugeMetricFamily("queue_shard_depth", "Images waiting, per queue shard", labels=["model", "shard"])
        held = GaugeMetricFamily(
            "queue_shard_in_progress", "Images claimed, per queue shard", labels=["model", "shard"]
        )
        sizes = HistogramMetricFamily("model_batch_size", "Images per batch the model ran", labels=["model"])
        for model, (queue, stats) in each.items():
            batches = sum(stats.batch_sizes.values())
            images = sum(size * n for size, n in stats.batch_sizes.items())
            values = {
                "queue_depth": stats.queue_depth,
                "queue_draining": stats.paused,
                "queue_in_progress": stats.in_progress,
                "queue_max": queue.queue_max,
                "model_workers_live": stats.live_workers,
                "queue_requeued_messages": stats.requeued,
                "model_batches": batches,
                "model_images": images,
                "model_inference_seconds": stats.inference_s,
            }
            for name, value in values.items():
                families[name].add_metric([model], value)
            for worker, beat in sorted(stats.heartbeats.items()):
                ages.add_metric([model, worker], max(0.0, stats.server_time - beat))
            for shard, (waiting, in_progress) in stats.shards.items():  # QUEUE_SHARDS > 1: they add up
                depth.add_metric([model, shard], waiting)
                held.add_metric([model, shard], in_progress)
            buckets = [
                (floatToGoString(bound), sum(n for size, n in stats.batch_sizes.items() if size <= bound))
                for bound in BATCH_SIZE_BUCKETS
            ]
            sizes.add_metric([model], [*buckets, ("+Inf", batches)], images)
        if each:
            yield from families.values()
            yield ages
            if depth.samples:
                yield depth
                yield held
            yield sizes


# The figures QueueCollector reads per model: name -> help.
GAUGES = {
    "queue_depth": "Images waiting for a model worker",
    "queue_draining": "1 while an operator drains the queue (admin.py drain): /predict refuses",
    "queue_in_progress": "Images claimed by model workers, not yet answered",
    "queue_max": "QUEUE_MAX: waiting plus in progress at which /predict answers 503",
    "model_workers_live": "Model workers whose heartbeat is younger than WORKER_TTL_S",
}
COUNTERS = {
    "queue_requeued_messages": "Messages put back on the queue: a dead worker's batch, or what a worker handed back",
    "model_batches": "Batches the model ran and answered, all workers",
    "model_images": "Images in those batches",
    "model_inference_seconds": "Seconds the model spent on those batches",
}


def exposition(models: ModelDirectory, accept: str | None) -> tuple[bytes, str]:
    """The body and content type of a scrape (OpenMetrics when the scraper asks for it, else text 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MultiProcessCollector(None) if MULTIPROCESS else REGISTRY)
    registry.register(QueueCollector(models))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
