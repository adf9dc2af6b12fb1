"""The optional API key: who gets in, what they are told, and what is counted."""

import httpx
import pytest
from conftest import error_message, metric
from benchmarks.running import server_thread
from pydantic import ValidationError

from server.settings import Settings

KEY = "k3y-with-enough-entropy"


@pytest.fixture(scope="module")
def url(tiny_bundles):
    settings = Settings(weights=[str(tiny_bundles["text"])], device="cpu", max_batch_size=2, api_key=KEY)
    with server_thread(settings) as base:
        yield base


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_key_post_endpoints_answer_401_with_a_bearer_challenge(url):
    for path in ("/generate", "/refine", "/v1/images/generations", "/edit", "/v1/images/edits"):
        r = httpx.post(f"{url}{path}", json={"prompt": "a red circle"})
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in error_message(r)


@pytest.mark.parametrize(
    "header", ["Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", "Bearer", KEY]
)
def test_a_wrong_or_malformed_key_answers_401(url, header):
    r = httpx.post(f"{url}/generate", json={"prompt": "a red circle"}, headers={"Authorization": header})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["detail"]


def test_the_right_key_is_served_and_the_scheme_is_case_insensitive(url):
    assert httpx.post(f"{url}/generate", json={"prompt": "a red circle"}, headers=_bearer(KEY)).status_code == 200
    assert (
        httpx.post(
            f"{url}/generate", json={"prompt": "a red circle"}, headers={"Authorization": f"bearer  {KEY}"}
        ).status_code
        == 200
    )
    assert httpx.get(f"{url}/v1/models", headers=_bearer(KEY)).status_code == 200


def test_probes_metrics_and_docs_are_exempt_but_models_are_not(url):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_the_key_is_checked_before_the_body_is_read(url):
    # An unauthenticated client learns nothing from validation or size errors.
    assert (
        httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 401
    )
    assert httpx.post(f"{url}/generate", content=b"x" * 200_000).status_code == 401


def test_401s_are_counted_per_endpoint(url):
    before = metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/generate", status="401")
    for _ in range(3):
        httpx.post(f"{url}/generate", json={"prompt": "a red circle"}, headers=_bearer("nope"))
    after = metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/generate", status="401")
    assert after == before + 3


def test_openapi_declares_the_bearer_scheme_on_guarded_operations_only(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/generate"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "401" in schema["paths"]["/generate"]["post"]["responses"]


def test_exempt_paths_are_configurable_through_the_environment(tiny_bundles, monkeypatch):
    monkeypatch.setenv("SOFTDIMO_AUTH_EXEMPT_PATHS", "/healthz, /readyz")
    settings = Settings(weights=[str(tiny_bundles["text"])], device="cpu", max_batch_size=1, api_key=KEY)
    assert settings.auth_exempt_paths == ["/healthz", "/readyz"]
    with server_thread(settings) as base:
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/metrics", headers=_bearer(KEY)).status_code == 200
        assert httpx.get(f"{base}/openapi.json").status_code == 401


def test_without_a_key_configured_nothing_is_guarded(tiny_bundles):
    with server_thread(Settings(weights=[str(tiny_bundles["text"])], device="cpu", max_batch_size=1)) as base:
        assert httpx.post(f"{base}/generate", json={"prompt": "a red circle"}).status_code == 200
        assert "securitySchemes" not in httpx.get(f"{base}/openapi.json").json().get("components", {})


def test_key_settings_are_cleaned_or_refused():
    assert Settings(api_key=" key-from-a-file\n", weights=[]).api_key == "key-from-a-file"
    with pytest.raises(ValidationError, match="api_key is empty"):
        Settings(api_key="  ", weights=[])
