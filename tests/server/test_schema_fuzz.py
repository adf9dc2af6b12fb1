"""The server against its own OpenAPI description, with every check schemathesis has: requests the description
admits are served, requests it refuses are refused with a 4xx, and every answer is one it declares. The deployment
serves text and class models, one-step models and teachers, so every branch of the request bodies is drawn from."""

import json
import re
import subprocess
import sys
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from benchmarks.running import server_thread

from server.schemas import RefineRequest
from server.settings import Settings
from softdimo import shapes

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

MODELS = ("one-step", "text", "class", "one-step-class")  # a one-step text model first: the default model
# 50 requests per mode on each endpoint that takes prompts: enough to draw every prompt kind; fixed, so repeatable.
DRAWS = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def _largest_cost() -> int:
    """The most images x steps x best_of the request fields admit: a limit no admitted request passes."""
    fields = RefineRequest.model_json_schema()["properties"]
    steps = next(part["maximum"] for part in fields["steps"]["anyOf"] if "maximum" in part)
    return fields["n"]["maximum"] * fields["best_of"]["maximum"] * steps


@pytest.fixture(scope="module")
def url(tiny_bundles):
    # The cost limit bounds a product of fields, which the description states in words only (server/openapi.py):
    # set where no admitted request reaches it, every admitted request is served.
    cost = _largest_cost()
    config = Settings(
        weights=[str(tiny_bundles[name]) for name in MODELS],
        device="cpu",
        max_batch_size=16,
        max_wait_ms=0,
        max_request_cost=cost,
        max_queue_cost=cost,
    )
    with server_thread(config) as base:
        yield base


def test_schemathesis_run_with_every_check_finds_nothing(url, tmp_path):
    """`schemathesis run --checks all` as anyone would run it: the schema's examples, its coverage cases (bounds,
    missing fields, wrong methods) and generated requests, valid and invalid."""
    har = tmp_path / "run.har"
    # A job's id is random: schemathesis can only draw unknown ones, which answer the 404 the description declares.
    # An edit's image and mask are base64 or binary PNGs of the model's size, which no schema can say: drawn at random,
    # they are refused with 422 (mostly: hence no warning about it), as the description says (server/openapi.py).
    (tmp_path / "schemathesis.toml").write_text(
        '[[operations]]\ninclude-path-regex = "^/v1/jobs/\\\\{job_id\\\\}"\nwarnings = false\n'
        '[[operations]]\ninclude-path-regex = "^/(edit|v1/images/edits)$"\nwarnings = false\n'
        'checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "422", "429"]\n'
    )
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    entries = json.loads(har.read_text())["log"]["entries"]
    for entry in entries:  # jobs the run submitted: cancelled, so that they do not keep the device busy
        if entry["request"]["url"].endswith("/v1/jobs") and entry["response"]["status"] == 202:
            httpx.delete(f"{url}/v1/jobs/{json.loads(entry['response']['content']['text'])['id']}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout, run.stdout[-6000:]

    seen = Counter()
    for entry in entries:
        path = "/" + entry["request"]["url"].split("/", 3)[-1]
        body = _json(entry["request"].get("postData", {}).get("text"))
        model = body.get("model") if isinstance(body, dict) else None
        seen[(path, entry["response"]["status"], model if isinstance(model, str) else None)] += 1
    # Both sides on every endpoint that takes a body, and every model named and served, class and teacher too.
    for path in ("/generate", "/refine", "/v1/images/generations", "/v1/jobs", "/edit"):  # /edit: its examples
        assert sum(n for (p, status, _), n in seen.items() if p == path and status in (200, 202)) >= 1, seen
        assert sum(n for (p, status, _), n in seen.items() if p == path and status == 422) >= 1, seen
    for model in ("tiny-text", "tiny-class", "tiny-one-step-class"):
        assert seen[("/generate", 200, model)] >= 1, seen
    assert sum(seen.values()) >= 300
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_prompts_drawn_from_the_grammar_pattern_are_served_and_others_refused_naming_the_vocabulary(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = {result.ok().path: result.ok() for result in schema.get_all_operations()}
    load_all_checks()
    checks = [check for check in CHECKS.get_all() if not isinstance(check, type)]
    served, refused = Counter(), []
    for path in ("/generate", "/v1/images/generations"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @DRAWS
            @given(case=operations[path].as_strategy(mode))
            def check(case):
                response = case.call(base_url=url, timeout=60)
                case.validate_response(response, checks=checks)
                prompt = case.body.get("prompt") if isinstance(case.body, dict) else None
                if not isinstance(prompt, str):
                    return
                if response.status_code == 200:
                    served[shapes.parse_prompt(prompt).kind] += 1
                elif not re.fullmatch(shapes.prompt_pattern(), prompt):
                    refused.append((prompt, response))

            check()
    assert set(served) == set(shapes.KINDS), served  # every form of the grammar was drawn and served
    assert len(refused) >= 10
    for prompt, response in refused:
        assert response.status_code == 422
        if (
            "not a Shapes prompt" in response.text
        ):  # the grammar's message (a body broken elsewhere too says that instead)
            assert "colors: red, green" in response.text, (prompt, response.text)
    assert any("not a Shapes prompt" in response.text for _, response in refused)


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
