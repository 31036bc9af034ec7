"""WSGI entry point for Apache mod_wsgi (and any WSGI server): the same app gunicorn serves."""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import settings  # noqa: E402
from run_web_server import create_app  # noqa: E402

logging.basicConfig(level=settings.LOG_LEVEL, format=settings.LOG_FORMAT)
application = create_app()
