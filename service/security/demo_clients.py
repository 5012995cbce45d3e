"""Demo OAuth clients for the demo alliance (``yilian demo-data`` seeds them).

* ``demo-his-yq1``: the lead hospital's HIS (Organization/hospital-yq1), client_secret_basic,
  ``system/*.cruds``;
* ``demo-clinic-shangzhan``: a community health centre's system
  (Organization/clinic-yq-shangzhan), client_secret_basic, ``system/*.cruds``.

Their secrets are random and printed once, when the client is created. For trying the API
without them, ``yilian demo-token --client demo-his-yq1`` signs a token for a demo client
directly (it needs database access, i.e. it runs where the server runs; it refuses
non-demo clients).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings


@dataclass(frozen=True)
class DemoClient:
    client_id: str
    name: str
    organization: str
    scopes: str


DEMO_CLIENTS = (
    DemoClient("demo-his-yq1", "阳泉市第一人民医院 HIS (demo)", "Organization/hospital-yq1", "system/*.cruds"),
    DemoClient("demo-clinic-shangzhan", "上站街道社区卫生服务中心 (demo)", "Organization/clinic-yq-shangzhan",
               "system/*.cruds"),
)


def seed_demo_clients(settings: Settings, *, quiet: bool = False) -> dict[str, str | None]:
    """Create the demo clients that are missing; returns client_id → secret (None when the
    client existed already: its secret is not known any more)."""
    from service.fhir.db import create_engine
    from service.security.oauth.runtime import SecurityRuntime

    engine = create_engine(settings.database_url)
    try:
        runtime = SecurityRuntime.create(settings, engine)
        created: dict[str, str | None] = {}
        for demo in DEMO_CLIENTS:
            if runtime.clients.get(demo.client_id, include_disabled=True) is not None:
                created[demo.client_id] = None
                continue
            _, secret = runtime.clients.create(name=demo.name, organization=demo.organization, scopes=demo.scopes,
                                               secret=True, client_id=demo.client_id, demo=True)
            created[demo.client_id] = secret
    finally:
        engine.dispose()
    if not quiet:
        _print_hint(settings, created)
    return created


def _print_hint(settings: Settings, created: dict[str, str | None]) -> None:
    token_url = settings.base_url.rstrip("/").removesuffix("/fhir") + "/oauth/token"
    print("demo OAuth clients (client_secret_basic, scope system/*.cruds):")
    for client_id, secret in created.items():
        if secret:
            print(f"  {client_id}  secret {secret}  (shown once)")
            print(f"    curl -s -u '{client_id}:{secret}' -d grant_type=client_credentials {token_url}")
        else:
            print(f"  {client_id}  (exists; its secret was shown when it was created)")
    print("a ready token for curl:  .venv/bin/yilian demo-token --client demo-his-yq1")
