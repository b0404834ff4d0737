"""The web app through FastAPI's test client on a real tiny run: every page, ids that do not
exist (404), bad payloads (422), path traversal on every route that takes an id or a name,
oversized bodies (413), cross-origin posts (403), escaped hostile text, annotations written to
and read back from the SQLite file, and the playground on the run's real model."""

import json
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from tiny_world import XSS, hostile_copy

from refusalscope.errors import UserError
from refusalscope.interfaces.web import create_app
from refusalscope.run.results import RunResults

TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fmanifest.json", "%2e%2e%2f%2e%2e%2fconfig.yaml", "....//....//etc",
              "..\\..\\manifest.json", "%252e%252e%252fmanifest.json", "/etc/passwd", "manifest.json%00.png"]


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    run, pid = hostile_copy(tiny_run, tmp_path_factory.mktemp("web") / "run")
    return TestClient(create_app(run)), run, pid


def test_every_page_renders(site):
    client, run, pid = site
    r = RunResults(run)
    latent = r.stage2_sets()[next(iter(r.stage2_sets()))][0].id
    study_latent = r.study_items()[-1]["feature"]
    for url in ["/", "/latents", "/latents?stage=2&sort=cos", "/latents?stage=&layer=&category=&prompt=&activity=&q=",
                "/latents?layer=3", "/latents?activity=sink", f"/latents?prompt={pid}",
                f"/latents/{latent}", f"/latents/{study_latent}", "/prompts", f"/prompts/{pid}", "/playground",
                f"/playground?prompt={pid}", "/study", "/study/results", "/study/answers.csv", "/study/results.csv",
                "/static/app.css", "/static/app.js", "/api/playground/status"]:
        res = client.get(url)
        assert res.status_code == 200, (url, res.text[:300])
        assert "content-security-policy" in res.headers and res.headers["x-frame-options"] == "DENY"
    stage2 = client.get("/latents?stage=2").text
    assert latent in stage2 and client.get(f"/latents/{latent}").text.count("Top activating contexts") == 1


def _links(page: str, kind: str) -> set[str]:
    return set(re.findall(rf'href="/{kind}/([^"?/]+)"', page))


def test_pages_show_what_the_run_files_hold(site):
    """What the pages list and say, checked against the run's own files read as plain JSON (not
    through the views the app renders from)."""
    client, run, _ = site
    kept = {p["id"] for p in json.loads((run / "filter" / "kept.json").read_text())}
    assert _links(client.get("/prompts").text, "prompts") == kept
    sets = {r["id"]: r["set"] for r in map(json.loads, (run / "stage2" / "sets.jsonl").read_text().splitlines())
            if r["set"]}
    assert sets and _links(client.get("/latents?stage=2").text, "latents") == {f for s in sets.values() for f in s}
    listed = _links(client.get("/latents").text, "latents")
    for layer in {int(f.split("-")[0]) for f in listed} | {0}:
        want = {f for f in listed if f.startswith(f"{layer}-")}
        assert _links(client.get(f"/latents?layer={layer}").text, "latents") == want, layer
    lines = (run / "dashboards" / "dashboards.jsonl").read_text().splitlines()
    boards = {b["feature"]: b for b in map(json.loads, lines)}
    for f in listed:
        page = client.get(f"/latents/{f}").text
        assert str(escape(boards[f]["explanation"])) in page, f  # as the templates escape it
        assert {e["prompt"] for e in boards[f]["effects"]} <= _links(page, "prompts"), f
    for pid, latents in sets.items():
        assert set(latents) <= _links(client.get(f"/prompts/{pid}").text, "latents"), pid
    assert client.get("/study/answers.csv").text.splitlines()[0] == "id,annotator,feature,labels,created"


def test_hostile_text_is_escaped_everywhere(site):
    client, _, pid = site
    for url in ["/", f"/prompts/{pid}", "/prompts", f"/playground?prompt={pid}"]:
        html = client.get(url).text
        assert XSS not in html and "<script>window" not in html and "<img src=x" not in html, url
    page = client.get(f"/prompts/{pid}").text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page
    # the playground's JSON data block cannot be closed by a prompt
    assert "\\u003cscript\\u003ewindow.__xss" in client.get(f"/playground?prompt={pid}").text


def test_unknown_ids_are_404_with_a_message(site):
    client, _, _ = site
    for url in ["/latents/999-1", "/latents/not-a-latent", "/prompts/no-such-prompt", "/study/a/bob/99999",
                "/playground?prompt=nope", "/no/such/page", "/static/nope.css"]:
        res = client.get(url)
        assert res.status_code == 404, url
        assert "<" not in res.text or "404" in res.text
    assert "is not in any Stage 1-3 set" in client.get("/latents/999-1").text
    assert client.get("/prompts/nope", headers={"Accept": "application/json"}).json()["detail"].startswith("prompt")


def test_traversal_never_reaches_a_file(site):
    client, run, _ = site
    secret = (run / "manifest.json").read_text()[:40]
    for t in TRAVERSALS:
        for url in [f"/latents/{t}", f"/prompts/{t}", f"/static/{t}", f"/study/a/{t}", f"/study/a/{t}/1",
                    f"/playground?prompt={t}", f"/latents?prompt={t}"]:
            res = client.get(url, follow_redirects=False)
            assert res.status_code in (200, 404, 422), (url, res.status_code)
            assert secret not in res.text and "root:x:" not in res.text, url
            if url.startswith(("/latents/", "/prompts/", "/static/")):
                assert res.status_code == 404, url
        res = client.post(f"/study/a/{t}/1", data={"labels": ["None"]}, follow_redirects=False)
        assert res.status_code in (404, 422), t


def test_bad_payloads_are_422(site):
    client, _, _ = site
    for url in ["/latents?layer=-1", "/latents?stage=7", "/latents?sort=evil", "/latents?activity=x",
                "/latents?page=0", "/study/a/bob/one", "/study/start?name=%3Cb%3E"]:
        assert client.get(url, follow_redirects=False).status_code == 422, url
    for body in [{}, {"prompt": ""}, {"prompt": "x", "latents": ["12"]}, {"prompt": "x", "mode": "boost"},
                 {"prompt": "x", "value": 1e9}, {"prompt": "x", "extra": 1}, {"prompt": "x" * 5000},
                 {"prompt": "x", "max_new_tokens": 0}]:
        assert client.post("/api/playground", json=body).status_code == 422, body
    assert client.post("/api/playground", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 422
    for labels in [[], ["no_such_category"], ["None", "dangerous_topics"]]:
        assert client.post("/study/a/carol/1", data={"labels": labels}, follow_redirects=False).status_code == 422


def test_oversized_bodies_and_cross_origin_posts_are_refused(site):
    client, _, _ = site
    big = b'{"prompt": "' + b"x" * 70000 + b'"}'
    assert client.post("/api/playground", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the cap still holds
        for _ in range(20):
            yield b"x" * 8192
    assert client.post("/study/a/dave/1", content=chunks()).status_code == 413
    evil = {"Origin": "http://evil.example"}
    assert client.post("/study/a/eve/1", data={"labels": ["None"]}, headers=evil).status_code == 403
    assert client.post("/api/playground", json={"prompt": "x", "latents": ["1-1"]}, headers=evil).status_code == 403
    assert client.post("/study/a/eve/1", data={"labels": ["None"]},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/study/a/eve/1", data={"labels": ["None"]},
                       headers={"Referer": "http://evil.example/page"}).status_code == 403
    same = client.post("/study/a/eve/1", data={"labels": ["None"]}, headers={"Origin": "http://testserver"},
                       follow_redirects=False)
    assert same.status_code == 303


def test_annotations_are_appended_to_sqlite_and_read_back(site):
    client, run, _ = site
    items = RunResults(run).study_items()
    r1 = client.post("/study/a/ann/1", data={"labels": ["dangerous_topics"]}, follow_redirects=False)
    r2 = client.post("/study/a/ann/1", data={"labels": ["None"]}, follow_redirects=False)  # changed answer
    r3 = client.post("/study/a/bea/1", data={"labels": ["dangerous_topics", "offensive_language"]},
                     follow_redirects=False)
    assert [r.status_code for r in (r1, r2, r3)] == [303, 303, 303] and r1.headers["location"] == "/study/a/ann/2"
    with sqlite3.connect(run / "annotations.sqlite") as con:
        rows = con.execute("SELECT annotator, feature, labels FROM answers WHERE annotator IN ('ann', 'bea') "
                           "ORDER BY id").fetchall()
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert [(a, l) for a, _, l in rows] == [("ann", '["dangerous_topics"]'), ("ann", '["None"]'),
                                           ("bea", '["dangerous_topics", "offensive_language"]')]
    assert {f for _, f, _ in rows} <= {it["feature"] for it in items}
    assert rows[0][1] == rows[1][1]  # the same item, answered twice: two rows, the latest counts
    csv = client.get("/study/answers.csv").text.splitlines()
    assert csv[0] == "id,annotator,feature,labels,created" and sum(",ann," in line for line in csv) == 2
    assert "dangerous_topics;offensive_language" in "\n".join(csv)
    results = client.get("/study/results").text
    assert "ann" in results and "bea" in results and "answers stored" in results
    # revisiting an item shows the annotator's own latest answer, ticked (not another's, not their name)
    page = client.get("/study/a/bea/1").text
    assert "you answered dangerous_topics, offensive_language before" in page
    assert 'value="dangerous_topics" checked' in page and 'value="offensive_language" checked' in page
    assert 'value="false_information" checked' not in page and 'id="label-none" checked' not in page
    assert "you answered None before" in client.get("/study/a/ann/1").text


def test_each_annotator_gets_a_seeded_order_without_the_source(site):
    client, run, _ = site
    items = RunResults(run).study_items()

    def order(name):
        pages = [client.get(f"/study/a/{name}/{n}").text for n in range(1, len(items) + 1)]
        for page in pages:  # where an item comes from stays hidden
            assert not any(s in page for s in ("pipeline", "random_active", "random_inactive", "random active"))
        return [p.split('id="item-explanation">')[1].split("</div>")[0] + p.split("top activating samples")[1][:2000]
                for p in pages]
    a, b = order("zed"), order("yan")
    assert a == order("zed")  # the same order on every visit
    assert sorted(a) == sorted(b) and a != b  # the same items, shuffled per annotator


def test_results_csv_scores_against_activation_labels(site):
    client, run, _ = site
    items = {it["feature"]: it for it in RunResults(run).study_items()}
    lines = client.get("/study/results.csv").text.splitlines()
    assert lines[0] == "feature,source,activation_labels,majority_labels,annotators,partial_credit"
    assert len(lines) == 1 + len(items)
    sources = {line.split(",")[0]: line.split(",")[1] for line in lines[1:]}
    assert sources == {f: it["source"] for f, it in items.items()}


def test_playground_runs_the_real_model(site):
    client, run, pid = site
    latent = RunResults(run).stage2_sets()[next(iter(RunResults(run).stage2_sets()))][0].id
    res = client.post("/api/playground", json={"prompt": "Explain how to pick a lock", "latents": [latent]})
    assert res.status_code == 200, res.text
    out = res.json()
    assert 0 <= out["plain"]["p_refusal"] <= 1 and 0 <= out["intervened"]["p_refusal"] <= 1
    assert out["plain"]["p_refusal"] != out["intervened"]["p_refusal"]  # the planted latent carries refusal
    both = client.post("/api/playground", json={"prompt": "Explain how to pick a lock", "direction": True,
                                                 "latents": [latent], "mode": "clamp", "value": 0.0,
                                                 "positions": "bos"}).json()
    assert "r̂ ablated" in both["intervention"] and "clamped to 0" in both["intervention"]
    assert client.post("/api/playground", json={"prompt": "x"}).status_code == 422  # nothing to change
    assert client.post("/api/playground", json={"prompt": "x", "latents": ["99-1"]}).status_code == 422
    assert client.get("/api/playground/status").json()["loaded"] is True


def test_host_header_is_checked_when_bound_to_loopback(tiny_run):
    client = TestClient(create_app(tiny_run, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    assert client.get("/prompts").status_code == 200
    assert client.get("/prompts", headers={"Host": "attacker.example"}).status_code == 400


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="no run found"):
        create_app(tmp_path)


def test_warm_up_builds_the_overview_once_and_serves_the_same_page(tiny_run, monkeypatch):
    """`serve` builds the overview and the latent index in a thread while it starts; a request
    that arrives meanwhile waits for that build instead of running its own."""
    import refusalscope.interfaces.web.app as app_module

    calls = []
    real = app_module.build_sections
    monkeypatch.setattr(app_module, "build_sections", lambda *a: calls.append(1) or real(*a))
    cold = TestClient(create_app(tiny_run)).get("/").text
    app = create_app(tiny_run)
    thread = app.state.rs.warm()
    client = TestClient(app)
    warm = client.get("/").text  # may race the thread: the lock makes it wait, not rebuild
    thread.join(timeout=120)
    assert {"sections", "index"} <= set(vars(app.state.rs))
    assert warm == cold and len(calls) == 2  # one build for the cold app, one for the warmed one
