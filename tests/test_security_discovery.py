"""Issue #4 point 1: SMART discovery, the CapabilityStatement's security, our JWKS."""

from __future__ import annotations

import httpx
import pytest

from tests.test_security_support import BASE

SMART_CONFIG = "/.well-known/smart-configuration"


@pytest.mark.parametrize("accept", ["application/json", "application/fhir+json", "text/html", "*/*"])
async def test_smart_configuration_is_json_whatever_the_accept_header(auth_client: httpx.AsyncClient,
                                                                      accept: str) -> None:
    response = await auth_client.get(SMART_CONFIG, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    config = response.json()
    assert config["token_endpoint"] == "http://testserver/oauth/token"
    assert config["authorization_endpoint"] == "http://testserver/oauth/authorize"
    assert config["introspection_endpoint"] == "http://testserver/oauth/introspect"
    assert config["revocation_endpoint"] == "http://testserver/oauth/revoke"
    assert config["jwks_uri"] == "http://testserver/oauth/jwks"


async def test_smart_configuration_advertises_what_we_enforce(auth_client: httpx.AsyncClient) -> None:
    config = (await auth_client.get(SMART_CONFIG)).json()
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert {"private_key_jwt", "client_secret_basic"} <= set(config["token_endpoint_auth_methods_supported"])
    assert set(config["grant_types_supported"]) == {"authorization_code", "refresh_token", "client_credentials"}
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert {"launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "permission-v1", "permission-v2", "permission-patient", "permission-user",
            "context-standalone-patient"} <= set(config["capabilities"])
    assert {"system/*.cruds", "patient/*.rs", "launch/patient"} <= set(config["scopes_supported"])


async def test_smart_configuration_needs_no_token_and_is_not_a_resource_type(auth_client: httpx.AsyncClient) -> None:
    # /fhir/.well-known/... must not be swallowed by /fhir/{resource_type}
    response = await auth_client.get(SMART_CONFIG)
    assert response.status_code == 200 and "resourceType" not in response.json()


async def test_capability_statement_carries_the_smart_security_extension(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.get("/metadata")  # public: no token
    assert response.status_code == 200
    security = response.json()["rest"][0]["security"]
    coding = security["service"][0]["coding"][0]
    assert coding == {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                      "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}
    (oauth,) = [e for e in security["extension"]
                if e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"]
    uris = {e["url"]: e["valueUri"] for e in oauth["extension"]}
    assert uris == {"token": "http://testserver/oauth/token", "authorize": "http://testserver/oauth/authorize",
                    "introspect": "http://testserver/oauth/introspect", "revoke": "http://testserver/oauth/revoke"}


async def test_development_mode_capability_statement_asks_for_no_security(client: httpx.AsyncClient) -> None:
    statement = (await client.get("/metadata")).json()
    assert "security" not in statement["rest"][0]


async def test_jwks_publishes_public_signing_keys_only(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.get("http://testserver/oauth/jwks")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert keys and all(k["kty"] == "RSA" and k["kid"] and "d" not in k and "p" not in k for k in keys)


def test_urls_follow_the_configured_base() -> None:
    from service.security.oauth.config import OAuthUrls

    behind_proxy = OAuthUrls.from_base("https://gw.example.cn/yilian/fhir/")
    assert behind_proxy.fhir_base == "https://gw.example.cn/yilian/fhir"
    assert behind_proxy.token == "https://gw.example.cn/yilian/oauth/token"
    other = OAuthUrls.from_base("https://fhir.example.cn/r4")
    assert other.token == "https://fhir.example.cn/oauth/token"
    assert BASE.endswith("/fhir")
