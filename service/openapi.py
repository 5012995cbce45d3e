"""The committed OpenAPI document (``make openapi``); a test fails when it is stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from service.config import Settings


def openapi_document() -> dict[str, Any]:
    import sqlalchemy as sa

    from service.app import create_app

    # The document depends on routes only; an in-memory engine keeps this free of side effects.
    app = create_app(Settings(database_url="sqlite://"), engine=sa.create_engine("sqlite://"))
    return app.openapi()


def render() -> bytes:
    return orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_openapi(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render())
