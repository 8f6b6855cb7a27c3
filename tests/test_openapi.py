"""The OpenAPI document stays true: schemathesis against the live server, zero failures."""

from __future__ import annotations

import hashlib
import secrets
import subprocess

import pytest
import requests

from tests.servers import BIN

CONFIG = """
[checks.positive_data_acceptance]
# 404: an id that does not exist; 409: not enough stock; 422: the generator reused an
# Idempotency-Key with another body. All are correct answers to well-formed requests.
expected-statuses = ["2xx", "404", "409", "422"]

[checks.negative_data_rejection]
expected-statuses = ["400", "404", "405", "409", "413", "415", "422"]
"""


def test_document_is_served(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {
        "/api/products",
        "/api/products/{id}",
        "/api/products/{id}/stock",
        "/api/products/{id}/update-stock",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    write = doc["paths"]["/api/products/{id}/update-stock"]["post"]
    assert write["security"] == [{"apiKey": []}]
    assert {"401", "429"} <= set(write["responses"])
    assert "WWW-Authenticate" in write["responses"]["401"]["headers"]
    assert {"Retry-After", "X-RateLimit-Limit", "RateLimit-Limit"} <= set(
        write["responses"]["429"]["headers"]
    )
    read = doc["paths"]["/api/products/{id}"]["get"]
    assert read["security"] == [{}, {"apiKey": []}]  # a key is optional unless the server says
    assert "403" in doc["paths"]["/metrics"]["get"]["responses"]
    codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert {"unauthorized", "forbidden", "rate_limited"} <= set(codes)


@pytest.mark.slow
def test_schemathesis_finds_nothing(live_server, tmp_path):
    """With a key, on a server that takes no anonymous writes, as production runs."""
    key = secrets.token_urlsafe(32)
    server = live_server(
        WEB_CONCURRENCY="2",
        API_KEYS=f"schemathesis:{hashlib.sha256(key.encode()).hexdigest()}",
        ALLOW_ANONYMOUS_WRITES="0",
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    result = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            server.url("/openapi.json"),
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "all",
            "--exclude-checks",
            "ignored_auth,object_level_authorization",
            "--mode",
            "all",
            "--max-examples",
            "150",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "20261125",
            "--generation-database",
            "none",
            "--no-color",
            "--request-timeout",
            "10",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "Traceback" not in server.log()
    assert requests.get(server.url("/healthz")).status_code == 200
