"""The report and the web app on a run widened to 5,000 Stage 3 latents (benchmarks/wide_run.py:
the tiny run's rankings, Stage 3 records and dashboards grown to the size a 65k-wide run has):
dashboards are looked up by offset and equal the file's lines, the latent browser pages through
every latent exactly once, the playground and prompt pages inline no set, and the report stays
under 10 MB and says what it capped. Page times are the benchmark's (B10), never asserted."""

import json
from pathlib import Path

import pytest
from bench_scripts import load_benchmark
from fastapi.testclient import TestClient

from refusalscope.interfaces.latent_views import RunIndex
from refusalscope.interfaces.report import MAX_CARDS, build_report
from refusalscope.interfaces.web import create_app
from refusalscope.interfaces.web.pages import PAGE
from refusalscope.methods.dashboards import LatentDashboard
from refusalscope.run.dashboard_store import DashboardStore, build_index
from refusalscope.run.results import RunResults

ROOT = Path(__file__).resolve().parents[1]
N = 5000


def _wide_run_module():
    return load_benchmark("wide_run")


@pytest.fixture(scope="module")
def wide(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("wide") / "run"
    info = _wide_run_module().widen_run(tiny_run, run, N)
    return run, info


def test_widened_run_has_the_latents_asked(wide):
    run, info = wide
    r = RunResults(run)
    s3 = {f for s in r.stage3_sets().values() for f in s}
    assert len(s3) == N and info["n_latents"] == N
    idx = RunIndex(r)
    assert len(idx.latents) >= N and all(f.id in idx.dashboards for f in s3)


def test_dashboards_by_offset_equal_the_lines(wide, tmp_path):
    run, _ = wide
    jsonl = run / "dashboards" / "dashboards.jsonl"
    lines = {json.loads(x)["feature"]: json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()}
    store = RunResults(run).dashboard_store()
    assert set(store) == set(lines)
    for fid in list(lines)[:: max(1, len(lines) // 40)]:
        assert store[fid].to_json() == LatentDashboard.from_json(lines[fid]).to_json()
        assert store[fid].feature == fid
    # the in-memory index of a run without the file, and one rebuilt for a stale file, are the same
    assert build_index(jsonl) == store.meta
    stale = tmp_path / "index.json"
    stale.write_text(json.dumps({"size": 1, "rows": {}}))
    assert DashboardStore(jsonl, stale).meta == store.meta
    with pytest.raises(KeyError):
        store["0-999999"]


def test_browser_pages_through_every_latent_once(wide):
    run, _ = wide
    client = TestClient(create_app(run))
    idx = RunIndex(RunResults(run))
    total = len(idx.latents)
    pages = -(-total // PAGE)
    seen = []
    for page in range(1, pages + 1):
        html = client.get(f"/latents?sort=layer&page={page}").text
        ids = [a.split('"')[0] for a in html.split('href="/latents/')[1:]]
        seen += ids
        assert f"page {page} of {pages}" in html
        assert len(ids) == (PAGE if page < pages else total - PAGE * (pages - 1))
    assert len(seen) == total and set(seen) == set(idx.latents)
    assert seen == sorted(seen, key=lambda f: tuple(map(int, f.split("-"))))
    assert 'id="page-next"' in client.get("/latents?page=1").text
    assert 'id="page-next"' not in client.get(f"/latents?page={pages}").text


def test_playground_and_prompt_pages_inline_no_set(wide):
    run, _ = wide
    client = TestClient(create_app(run))
    idx = RunIndex(RunResults(run))
    pid = max(idx.sets["3"], key=lambda p: len(idx.sets["3"][p]))
    ids = [f.id for f in idx.sets["3"][pid]]
    page = client.get(f"/playground?prompt={pid}").text
    assert not any(f'"{f}"' in page for f in ids[:50])
    got = client.get(f"/api/playground/preset/{pid}").json()
    assert got["stage3"] == ids and got["stage2"] == [f.id for f in idx.sets["2"].get(pid, ())]
    assert client.get("/api/playground/preset/nope").status_code == 404
    rows = client.get("/prompts").text
    assert pid in rows and client.get(f"/prompts/{pid}").status_code == 200
    assert client.get(f"/latents/{ids[0]}").status_code == 200


def test_report_is_capped_and_says_so(wide):
    run, _ = wide
    html = build_report(run)
    assert len(html.encode()) <= 10_000_000
    assert html.count('class="card" id="latent-') == MAX_CARDS
    assert f"cards {MAX_CARDS} of the run's" in html and "refusalscope serve" in html
