"""``uvicorn service.main:app`` entry point (one app per worker process)."""

from service.app import create_app

app = create_app()
