"""Fixtures shared by the server tests: one set of tiny bundles per session."""

import pytest
from tiny_bundles import write_all


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("tiny-bundles"))


def metric(text: str, name: str, **labels) -> float:
    """The value of the first sample of `name` carrying `labels` in a Prometheus exposition, or 0."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
