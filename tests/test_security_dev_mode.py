"""Issue #4 point 5: YILIAN_AUTH=off is for local development only; the default is on."""

from __future__ import annotations

import logging

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.requests import Request

from service.api.deps import access_context
from service.app import create_app
from service.config import Settings
from service.security import CombinedPolicy, build_policy
from service.security.scopes import ScopePolicy
from tests.conftest import BASE


def test_authorization_is_on_by_default() -> None:
    assert Settings.model_fields["auth"].default == "on"


@pytest.mark.parametrize("auth, warned", [("off", True), ("on", False)])
def test_development_mode_warns_at_every_start(caplog: pytest.LogCaptureFixture, auth: str, warned: bool) -> None:
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="yilian.security"):
            create_app(Settings(database_url="sqlite://", auth=auth), engine=sa.create_engine("sqlite://"))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "YILIAN_AUTH=off" in r.message]
        assert bool(warnings) == warned


def _request(app: FastAPI, path: str, headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "app": app})


async def test_dev_header_names_the_organization_only_when_auth_is_off(app: FastAPI, auth_app: FastAPI) -> None:
    ctx = await access_context(_request(app, "/fhir/Patient", {"X-Yilian-Organization": "Organization/clinic-yq-hedi"}))
    assert ctx.organization == "Organization/clinic-yq-hedi" and ctx.client_id == "anonymous" and not ctx.scopes
    from service.fhir.errors import Unauthorized

    with pytest.raises(Unauthorized):
        await access_context(_request(auth_app, "/fhir/Patient",
                                      {"X-Yilian-Organization": "Organization/clinic-yq-hedi"}))


async def test_development_mode_needs_no_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/Organization?_count=1")).status_code == 200


async def test_metadata_and_discovery_need_no_token_when_auth_is_on(auth_client: httpx.AsyncClient) -> None:
    assert (await auth_client.get("/metadata")).status_code == 200
    assert (await auth_client.get("/.well-known/smart-configuration")).status_code == 200
    assert (await auth_client.get("/Organization")).status_code == 401
    assert BASE.endswith("/fhir")


def test_policy_combines_scopes_with_the_boundary_half() -> None:
    on = build_policy(Settings(database_url="sqlite://", auth="on"))
    parts = on.policies if isinstance(on, CombinedPolicy) else (on,)
    assert any(isinstance(p, ScopePolicy) for p in parts)
    off = build_policy(Settings(database_url="sqlite://", auth="off"))
    off_parts = off.policies if isinstance(off, CombinedPolicy) else (off,)
    assert not any(isinstance(p, ScopePolicy) for p in off_parts)
