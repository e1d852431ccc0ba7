"""An app for ``uvicorn --workers N``: every worker wraps the same ``ProcessEngine`` address, so they share one
engine process (``test_process_engine_workers.py``). Configured by environment variables, as a deployment would."""

from __future__ import annotations

import os

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.engines.process import ProcessEngine

from .servers import SECRET_KEY, not_found_app

engine = ProcessEngine.from_pretrained(
    os.environ["CHATSTREAM_TEST_MODEL"], address=os.environ["CHATSTREAM_TEST_ENGINE"], linger=2.0, max_batch_size=4
)
app = ChatStreamMiddleware(
    not_found_app, engine=engine, secret_key=SECRET_KEY, max_concurrency=4, max_queue=16, drain_timeout=2
)
