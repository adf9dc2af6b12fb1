"""Requests generated from the server's own OpenAPI schema (schemathesis): well-formed, malformed and the schema's
examples. None may get a 5xx, and every answer (status, content type, body) must be one the schema declares."""

from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from live_server import live_server

from server.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_MODE = 20  # at most, per operation and mode: with the schema's examples about 130 requests


@pytest.fixture(scope="module")
def url(tiny_bundles):
    # The one-step model first, as the default: the schema's examples name no model and should be served.
    weights = [str(tiny_bundles[name]) for name in ("one-step", "text")]
    # A small cost limit keeps generated requests cheap: large ones are refused with 422 at once.
    config = Settings(weights=weights, device="cpu", max_batch_size=2, max_wait_ms=0, max_request_cost=48, max_queue_cost=96)
    with live_server(config) as base:
        yield base


def _run(strategy, *, url: str, examples: int, seen: Counter, path: str) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=url, timeout=60)
        seen[(path, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    check()


def test_generated_requests_get_declared_answers_and_never_a_5xx(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/refine", "/v1/images/generations", "/v1/models", "/readyz"}
    seen: Counter = Counter()
    for operation in operations:
        for strategy in schema.get_strategies_from_examples(operation):
            _run(strategy, url=url, examples=1, seen=seen, path=operation.path)
        _run(operation.as_strategy(GenerationMode.POSITIVE), url=url, examples=EXAMPLES_PER_MODE, seen=seen, path=operation.path)
        if operation.method.upper() == "POST":  # GET operations here take no input to get wrong
            _run(operation.as_strategy(GenerationMode.NEGATIVE), url=url, examples=EXAMPLES_PER_MODE, seen=seen, path=operation.path)

    # Both sides were reached on every POST endpoint: images served (the examples) and requests refused.
    for path in ("/generate", "/refine", "/v1/images/generations"):
        assert seen[(path, 200)] >= 1 and seen[(path, 422)] >= 1, (path, seen)
    assert sum(seen.values()) >= 100
    assert httpx.get(f"{url}/readyz").status_code == 200
