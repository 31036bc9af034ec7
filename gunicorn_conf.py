"""gunicorn settings: `gunicorn -c gunicorn_conf.py run_web_server:app`. Values come from settings.py.

Timeouts, shortest first: a Redis blocking call (REDIS_BLOCK_S, 1 s) < a request's wait for its answer
(REQUEST_TIMEOUT_S, 10 s) < gunicorn's worker timeout (GUNICORN_TIMEOUT_S, 30 s) < the client's (60 s).
"""

import glob
import math
import os
import shutil
import tempfile

from gunicorn.glogging import Logger

import logs
import settings

logs.configure()  # the app's own loggers, in the workers too (they are forked from this process)
settings.current.check_web()  # the web's own settings (GUNICORN_TIMEOUT_S against the longest request): at start


class ServiceLogger(Logger):
    """gunicorn's own log and its access log in the service's format (text, or JSON with LOG_JSON)."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in [*self.error_log.handlers, *self.access_log.handlers]:
            handler.setFormatter(logs.formatter())


logger_class = ServiceLogger

# Where to listen: 127.0.0.1 by default; WEB_HOST=0.0.0.0 (or ::) to serve other machines.
_host = f"[{settings.WEB_HOST}]" if ":" in settings.WEB_HOST else settings.WEB_HOST
bind = f"{_host}:{settings.WEB_PORT}"

# Each request mostly waits on Redis for its answer, so threads, not processes, carry the
# concurrency: WEB_WORKERS x WEB_THREADS requests at once (2 x 32 by default: two full batches of 32 in
# flight, so the model has its next batch waiting). Processes: 1-4.
workers = settings.WEB_WORKERS
worker_class = "gthread"
threads = settings.WEB_THREADS

# A worker silent for this long is killed and replaced; longer than any request's wait.
timeout = settings.GUNICORN_TIMEOUT_S
# On SIGTERM, in-flight requests get this long to finish: the longest a request can take (15 s by default).
graceful_timeout = math.ceil(settings.current.longest_request_s)
keepalive = 5  # seconds an idle keep-alive connection is held open (2-10 behind a proxy)
backlog = 2048  # connections waiting to be accepted

# gunicorn 25+ opens a control socket in ~/.gunicorn by default; two instances on one machine
# (tests, a stack beside a service) would collide, and this service does not use gunicornc.
control_socket_disable = True

# One access-log line per request on stdout: status, bytes, duration (microseconds), and the request id
# that the model worker's log also carries (its INFO line per batch lists ids=...).
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(D)sus id=%({x-request-id}o)s'

# --- Prometheus metrics across worker processes (see metrics.py) -----------------------------------


def on_starting(server):
    """Before any worker forks: an empty directory for prometheus-client's per-process files.

    PROMETHEUS_MULTIPROC_DIR if set (its old files removed: stale counts of an earlier run would be
    summed in), else a private temporary one. Workers inherit the variable, so prometheus-client
    starts in multiprocess mode in each and /metrics sums them all, whichever worker is scraped.
    """
    path = settings.PROMETHEUS_MULTIPROC_DIR or tempfile.mkdtemp(prefix="gunicorn-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def pre_exec(server):
    """A binary upgrade (USR2) starts a new master with the environment gunicorn saved when it last read its
    configuration; after a reload (HUP) that holds this master's private directory, which the new master
    would take for the operator's (emptying it under this master's workers) and which on_exit here removes
    under the new generation. It makes its own instead."""
    if not settings.PROMETHEUS_MULTIPROC_DIR:
        server.cfg.env_orig.pop("PROMETHEUS_MULTIPROC_DIR", None)


def child_exit(server, worker):
    """A dead worker's counts stay (counters must not go back); its live gauges, if any, go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the private directory; one the operator named stays (it is emptied at the next start)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and not settings.PROMETHEUS_MULTIPROC_DIR:
        shutil.rmtree(path, ignore_errors=True)
