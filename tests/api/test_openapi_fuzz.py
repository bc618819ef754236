"""Schemathesis over /openapi.json: generated requests never get a 5xx, and every
response conforms to the schema the service publishes. Skipped without schemathesis."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from service.app import create_app
from tests.support import LiveServer, make_settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import (  # noqa: E402
    positive_data_acceptance,
)

pytestmark = pytest.mark.timeout(120)
EXAMPLES = 30  # per operation: the whole API in well under a minute


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    app = create_app(make_settings(tiny_store[0], tmp_path_factory.mktemp("data")))
    with LiveServer(app) as live:
        yield live


def excluded(case) -> list:
    # A schema cannot say "a decodable image": schema-valid base64 may rightly get a 400.
    return [positive_data_acceptance]


def test_generated_requests_get_no_5xx_and_conforming_responses(server):
    # schemathesis' pytest loader (from_fixture) breaks on pytest 9; drive hypothesis directly.
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case):
            case.call_and_validate(base_url=server.url, excluded_checks=excluded(case))

        check()
