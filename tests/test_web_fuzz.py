"""The web app's API fuzzed from its own OpenAPI schema with Schemathesis, on a copy of the tiny run:
no route answers 500 to any generated request, and every state-changing route (annotations, the
playground) still refuses a cross-site request (interfaces/web/guards.py)."""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from refusalscope.interfaces.web import create_app
from refusalscope.interfaces.web.guards import SAFE


@pytest.fixture(scope="module")
def web(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("webfuzz") / "run"
    shutil.copytree(tiny_run, run)
    return create_app(run, allowed_hosts=None)


@pytest.fixture(scope="module")
def api(web):
    schema = schemathesis.openapi.from_dict(web.openapi())  # the app serves no /openapi.json: built here
    schema.app = web
    return schema


def state_changing(app) -> list[tuple[str, str]]:
    """Every (method, path) of the app's schema that may change state."""
    return sorted((m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops
                  if m.upper() not in SAFE)


def test_no_route_answers_500(api):
    ops = [r.ok() for r in api.get_all_operations()]
    assert {op.path for op in ops} >= {"/api/playground", "/study/a/{name}/{n}", "/latents/{fid}"}
    statuses: dict[str, set[int]] = {}
    for op in ops:
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def one(case):
            # same-origin, as the app's own pages send them (the guard is tested below)
            response = case.call(headers={"origin": "http://testserver", "host": "testserver"})
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        one()
    assert len(statuses) == len(ops)  # every operation was called
    assert any(s & {400, 404, 413, 422} for s in statuses.values())  # and given inputs it refuses


def test_every_state_changing_route_refuses_a_cross_site_request(web, api):
    routes = state_changing(web)
    assert ("POST", "/api/playground") in routes and ("POST", "/study/a/{name}/{n}") in routes
    client = TestClient(web)
    for method, path in routes:
        url = path.replace("{name}", "ann").replace("{n}", "1")
        for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"},
                        {"referer": "https://evil.example/page"}):
            res = client.request(method, url, headers=headers, data={"labels": "None"})
            assert res.status_code == 403 and "cross-origin request refused" in res.json()["detail"], (method, url)
