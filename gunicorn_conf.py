"""gunicorn settings: `gunicorn -c gunicorn_conf.py run_web_server:app`. Values come from settings.py.

Timeouts, shortest first: a Redis blocking call (REDIS_BLOCK_S, 1 s) < a request's wait for its answer
(REQUEST_TIMEOUT_S, 10 s) < gunicorn's worker timeout (GUNICORN_TIMEOUT_S, 30 s) < the client's (60 s).
"""

import logging

import settings

logging.basicConfig(level=settings.LOG_LEVEL, format=settings.LOG_FORMAT)

# Where to listen: 127.0.0.1 by default; WEB_HOST=0.0.0.0 (or ::) to serve other machines.
_host = f"[{settings.WEB_HOST}]" if ":" in settings.WEB_HOST else settings.WEB_HOST
bind = f"{_host}:{settings.WEB_PORT}"

# Each request mostly waits on Redis for its answer, so threads, not processes, carry the
# concurrency: WEB_WORKERS x WEB_THREADS requests at once (2 x 16 by default). Processes: 1-4.
workers = settings.WEB_WORKERS
worker_class = "gthread"
threads = settings.WEB_THREADS

# A worker silent for this long is killed and replaced; longer than any request's wait.
timeout = settings.GUNICORN_TIMEOUT_S
# On SIGTERM, in-flight requests get this long to finish (each is bounded by REQUEST_TIMEOUT_S).
graceful_timeout = int(settings.REQUEST_TIMEOUT_S) + 5
keepalive = 5  # seconds an idle keep-alive connection is held open (2-10 behind a proxy)
backlog = 2048  # connections waiting to be accepted

# gunicorn 25+ opens a control socket in ~/.gunicorn by default; two instances on one machine
# (tests, a stack beside a service) would collide, and this service does not use gunicornc.
control_socket_disable = True

# One access-log line per request on stderr: status, bytes, duration (microseconds), request id.
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(D)sus id=%({x-request-id}o)s'
