"""Server tests keep their job store in a temporary folder, never in the working directory; the shared helpers of
tests/conftest.py are re-exported, since `from conftest import ...` finds this file first."""

import os

import pytest

from tests.conftest import error_message, metric, post_concurrently  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def job_store_in_a_temporary_folder(tmp_path_factory):
    # Session scope, so that it is set before module-scoped servers read their Settings (and their children inherit it).
    before = os.environ.get("SOFTDIMO_JOB_DB_PATH")
    os.environ["SOFTDIMO_JOB_DB_PATH"] = str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    yield
    if before is None:
        os.environ.pop("SOFTDIMO_JOB_DB_PATH", None)
    else:
        os.environ["SOFTDIMO_JOB_DB_PATH"] = before
