"""What the application does to its process once it has started (``service.app``)."""

from __future__ import annotations

import gc

import httpx
import sqlalchemy as sa
from opentelemetry import trace

from service.app import create_app
from service.config import Settings


async def test_objects_built_at_startup_are_frozen_out_of_the_garbage_collector(
        engine: sa.Engine, database_url: str) -> None:
    """The definitions, validation tables and statements built at startup live as long as the
    process; a full collection walking them again is a pause on some request (creates under
    load: p99 236-275 ms with them, 116-121 ms without). After startup they are frozen."""
    app = create_app(Settings(database_url=database_url, auth="off"), engine=engine)
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        async with app.router.lifespan_context(app):
            frozen = gc.get_freeze_count()
            assert frozen > 10_000, frozen  # the app's own objects at least, not just a handful
            cycle: list[object] = []
            cycle.append(cycle)  # garbage made while serving is still collected
            del cycle
            assert gc.collect() >= 1 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        app.state.audit_queue.close()


class _RecordingTracerProvider(trace.TracerProvider):
    """An OpenTelemetry tracer provider (API only) that notes the spans it is asked for."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        spans = self.spans

        class Tracer(trace.NoOpTracer):
            def start_span(self, name: str, *a: object, **k: object) -> trace.Span:
                spans.append(name)
                return super().start_span(name, *a, **k)

            def start_as_current_span(self, name: str, *a: object, **k: object):  # type: ignore[no-untyped-def]
                spans.append(name)
                return super().start_as_current_span(name, *a, **k)

        return Tracer()


async def test_opentelemetry_spans_only_when_configured(engine: sa.Engine, database_url: str) -> None:
    """FastAPI's native telemetry looks the providers up on every request: off by default
    (YILIAN_OPENTELEMETRY), on it traces requests with the configured provider."""
    provider = _RecordingTracerProvider()
    trace.set_tracer_provider(provider)  # once per process; nothing else here configures one
    assert trace.get_tracer_provider() is provider, "another test configured OpenTelemetry first"
    for enabled in (False, True):
        app = create_app(Settings(database_url=database_url, auth="off", opentelemetry=enabled), engine=engine)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                assert (await client.get("/healthz")).status_code == 200
        finally:
            app.state.audit_queue.close()
        assert bool(provider.spans) is enabled, provider.spans
