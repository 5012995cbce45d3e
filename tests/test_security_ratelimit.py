"""Issue #4 point 6: per-client rate limiting (429 with Retry-After and an OperationOutcome)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.security.oauth.config import SecuritySettings
from service.security.ratelimit import RateLimiter
from tests.conftest import BASE, bearer


@pytest.fixture
def limited_app(engine, auth_settings: Settings) -> Iterator[FastAPI]:  # type: ignore[no-untyped-def]
    yield create_app(auth_settings, engine=engine,
                     security=SecuritySettings(oauth_allow_http=True, rate_limit_burst=3, rate_limit_per_minute=6))


def _token(app: FastAPI, client_id: str) -> str:
    token, _ = app.state.security.tokens.issue_access_token(client_id=client_id, scope=["system/Organization.rs"],
                                                            organization="Organization/hospital-yq1", kind="backend")
    return token


async def test_a_client_over_its_rate_gets_429_with_retry_after(limited_app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited_app), base_url=BASE) as http:
        busy = bearer(_token(limited_app, "busy-client"))
        for _ in range(3):  # the burst
            assert (await http.get("/Organization?_count=1", headers=busy)).status_code == 200
        response = await http.get("/Organization?_count=1", headers=busy)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "throttled"
        # another client has its own bucket
        quiet = bearer(_token(limited_app, "quiet-client"))
        assert (await http.get("/Organization?_count=1", headers=quiet)).status_code == 200
        # discovery is not a client call and is never limited
        assert (await http.get("/metadata")).status_code == 200


def test_the_bucket_refills_at_the_configured_rate() -> None:
    now = [1000.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])  # one a second
    assert limiter.acquire("c") is None and limiter.acquire("c") is None
    wait = limiter.acquire("c")
    assert wait is not None and RateLimiter.retry_after(wait) == "1"
    now[0] += 1.0
    assert limiter.acquire("c") is None
    assert limiter.acquire("c") is not None
    now[0] += 60.0  # a long pause refills the burst, not more
    assert limiter.acquire("c") is None and limiter.acquire("c") is None and limiter.acquire("c") is not None
