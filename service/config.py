"""Settings, read from ``YILIAN_*`` environment variables (see the README table)."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="YILIAN_", extra="ignore")

    database_url: str = "sqlite:///./var/yilian.db"
    base_url: str = "http://127.0.0.1:8000/fhir"
    # PostgreSQL connections each worker keeps open (half as many again may open for bursts
    # and close after). Size it for the requests one worker serves at once: a connection
    # opened per request costs a PostgreSQL process fork. Workers × 1.5 × this, plus other
    # clients, must stay below the server's max_connections (100 by default).
    database_pool_size: int = 20
    # Requests whose synchronous part (database work) runs at once, per worker; unset: the pool size.
    request_threads: int | None = None
    # Load the demo alliance the first time the server starts on an empty database.
    demo_data: bool = False
    # Authorization arrives with the security issue; until then every caller is anonymous.
    auth: str = "on"
    # Largest request body accepted, in bytes (a 1,000-entry transaction fits comfortably).
    max_body_bytes: int = 50 * 1024 * 1024
    default_page_size: int = 20
    max_page_size: int = 1000
    # A search without _total counts its matches up to this many: Bundle.total is exact up
    # to here and left out above (with a note in the Bundle), so a page never costs a count
    # of millions. _total=accurate counts them all; _total=estimate asks PostgreSQL's planner.
    exact_total_limit: int = 1000
    log_level: str = "info"
    # Benchmarks only: expose /bench/floor/{type}/{id}, the bare primary-key read that
    # bench/ measures our FHIR read against. Never enable in production (no checks at all).
    bench_floor: bool = False
    # Audit (service.security.audit): AuditEvents are kept this many days (MLPS level 3: at
    # least 180), then `yilian audit purge` deletes them; queued read audits are turned into
    # AuditEvent resources in the background this often (0: only by `yilian audit drain`).
    audit_retention_days: int = 180
    audit_drain_interval_ms: int = 1000
    # FastAPI's native OpenTelemetry spans, metrics and logs (with a provider or OTLP exporter
    # configured as OpenTelemetry documents). Off, no request looks the providers up: that
    # lookup cost 3-4 % of a read's CPU with nothing configured.
    opentelemetry: bool = False


@lru_cache
def get_settings() -> Settings:
    return Settings()
