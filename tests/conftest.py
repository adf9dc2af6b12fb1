"""Shared fixtures: tiny models with fixed seeds, so tests are exact and fast."""

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_bundles import TINY_FSQ_TOKENIZER, tiny_tokenizer as make_tiny_tokenizer, tiny_transformer, write_all  # noqa: E402

from softdimo.conditioning import Conditioner  # noqa: E402
from softdimo.transformer import MaskedTransformer  # noqa: E402
from softdimo.vq import VQTokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def job_store_in_a_temporary_folder(tmp_path_factory):
    """Servers started by tests keep their job store in a temporary folder, never in the working directory."""
    # Session scope, so that it is set before module-scoped servers read their Settings (and their children inherit it).
    before = os.environ.get("SOFTDIMO_JOB_DB_PATH")
    os.environ["SOFTDIMO_JOB_DB_PATH"] = str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    yield
    if before is None:
        os.environ.pop("SOFTDIMO_JOB_DB_PATH", None)
    else:
        os.environ["SOFTDIMO_JOB_DB_PATH"] = before


@pytest.fixture
def tiny_tokenizer() -> VQTokenizer:
    tokenizer = make_tiny_tokenizer().eval()
    tokenizer.decode_chunk = 4  # as served: an image's pixels do not depend on its batch
    return tokenizer


@pytest.fixture
def tiny_fsq_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(TINY_FSQ_TOKENIZER).eval()


@pytest.fixture
def text_conditioner() -> Conditioner:
    return Conditioner.shapes_text()


@pytest.fixture
def tiny_text_transformer(text_conditioner) -> MaskedTransformer:
    torch.manual_seed(0)
    return tiny_transformer(text_conditioner).eval()


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    """One set of tiny bundles per session: tokenizer, reward, teachers and one-step models."""
    return write_all(tmp_path_factory.mktemp("tiny-bundles"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine its waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def error_message(response) -> str:
    """The message of an error answer: `detail` on native paths, the OpenAI error object's message under /v1/."""
    body = response.json()
    if response.url.path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"]
    return body["detail"]


def metric(text: str, name: str, **labels) -> float:
    """The value of the first sample of `name` carrying `labels` in a Prometheus exposition, or 0."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def post_concurrently(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once, on one client, and return the responses in order."""

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=b) for b in bodies))

    return asyncio.run(fire())
