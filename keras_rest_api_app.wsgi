"""WSGI entry point for Apache mod_wsgi (and any WSGI server): the same app gunicorn serves."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import logs  # noqa: E402
from run_web_server import create_app  # noqa: E402

logs.configure()
application = create_app()
