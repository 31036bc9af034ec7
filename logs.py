"""Logging for every process of the service (web app, gunicorn, model worker), set up here and nowhere else.

Two formats, one per line either way: text (settings.LOG_FORMAT, the default) or, with LOG_JSON=1, one
JSON object per line: {"time", "level", "logger", "pid", "message"}, plus "request_id" where one is known
and "exception" with the traceback. How a line learns its request id:

- web app: /predict sets REQUEST_ID for the request's thread (reset when the request ends), so every line
  logged while serving it carries the id it also returns in X-Request-ID;
- gunicorn's access log: the X-Request-ID of the response (text: `id=...` at the end of the line);
- model worker: a line about one request passes extra={"request_id": id}; the one INFO line per batch
  passes extra={"request_ids": [...]} (text: `ids=...`), so the default log level joins web and worker.
"""

import contextvars
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import settings

# The request the current thread is serving (web side); None outside one.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# gunicorn's access-log atoms (see access_log_format in gunicorn_conf.py) copied into a JSON line.
ACCESS_FIELDS = {"remote": "h", "method": "m", "path": "U", "status": "s", "bytes": "B", "duration_us": "D"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ASCII only, so a hostile path or file name cannot split a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            entry |= access_fields(record.args)
            request_id = record.args.get("{x-request-id}o")  # the response's X-Request-ID, if it had one
        if request_id:
            entry["request_id"] = request_id
        if getattr(record, "request_ids", None):
            entry["request_ids"] = record.request_ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def access_fields(atoms: Mapping) -> dict:
    """gunicorn's access-log atoms (it passes them as the format's mapping) as JSON fields, numbers as numbers."""
    fields = {}
    for field, atom in ACCESS_FIELDS.items():
        value = atoms.get(atom)
        if value not in (None, "-", ""):
            fields[field] = (
                int(value) if field in ("status", "bytes", "duration_us") and str(value).isdigit() else value
            )
    return fields


def formatter() -> logging.Formatter:
    """The formatter of every handler of the service: JSON with LOG_JSON, else the text format."""
    return JsonFormatter() if settings.LOG_JSON else logging.Formatter(settings.LOG_FORMAT)


def configure() -> None:
    """Log the root logger's records at LOG_LEVEL to stderr in the service's format; Python warnings too.

    Called once at the start of each process (gunicorn master, a model worker, the .wsgi file, the
    development server); gunicorn's own loggers get the same formatter through gunicorn_conf.py.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter())
    logging.basicConfig(level=settings.LOG_LEVEL, handlers=[handler])
    logging.captureWarnings(True)
