"""Downloads of a set's exports in the web app: every latent page and prompt set offers a Neuronpedia
list, the SAELens bundle and an `rs.apply` snippet; what they serve is read back (the bundle with
load_bundle, the snippet compiled) through FastAPI's client (in Chromium: test_export_web_browser.py)."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient

from refusalscope.export.bundle import load_bundle
from refusalscope.interfaces.web import create_app
from refusalscope.run.results import RunResults


@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(tiny_run))


def test_latent_and_prompt_pages_offer_each_download_and_they_read_back(client, tiny_run, tmp_path):
    res = RunResults(tiny_run)
    pid, fs = next((p, s) for p, s in res.stage2_sets().items() if len(s))
    fid = fs[0].id
    page = client.get(f"/latents/{fid}").text
    for kind in ("neuronpedia.json", "saelens.zip", "apply.py"):
        assert f'href="/export/{kind}/latent/{fid}"' in page
    prompt_page = client.get(f"/prompts/{pid}").text
    assert f'href="/export/saelens.zip/stage2/{pid}"' in prompt_page

    r = client.get(f"/export/saelens.zip/stage2/{pid}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    stem = f"refusalscope-stage2-{pid}"
    assert r.headers["content-disposition"] == f'attachment; filename="{stem}.zip"'
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    b = load_bundle(tmp_path / stem)
    assert b.set() == fs and b.saes[fs[0].layer]["path"] == str(tiny_run.parent / "saes" / f"layer_{fs[0].layer}")

    note = client.get(f"/export/neuronpedia.json/latent/{fid}").json()
    assert note["set"] == f"latent/{fid}" and "no public Neuronpedia pages" in note["note"]

    code = client.get(f"/export/apply.py/stage2/{pid}").text
    compile(code, "apply.py", "exec")
    assert f'load_bundle("{stem}")' in code and "with rs.apply(model, bundle):" in code
    assert all(f in code for f in fs.ids()[:12])


def test_unknown_sets_and_kinds_are_404(client):
    assert client.get("/export/neuronpedia.json/latent/9-99999").status_code == 404
    assert client.get("/export/neuronpedia.json/stage2/no-such-prompt").status_code == 404
    assert client.get("/export/excel.xlsx/core@1").status_code == 404
    assert client.get("/export/neuronpedia.json/core@x").status_code == 404


def test_the_report_carries_each_stage2_sets_downloads_as_data_uris(tiny_run, tmp_path):
    import base64
    import re

    from refusalscope.interfaces.report import build_report

    html = build_report(tiny_run)
    assert "<script" not in html.replace("&lt;script", "")
    res = RunResults(tiny_run)
    s2 = {pid: fs for pid, fs in res.stage2_sets().items() if len(fs)}
    zips = re.findall(r'href="data:application/zip;base64,([^"]+)" download="refusalscope-stage2-([^"]+)\.zip"', html)
    assert sorted(pid for _, pid in zips) == sorted(s2)
    data, pid = zips[0]
    zipfile.ZipFile(io.BytesIO(base64.b64decode(data))).extractall(tmp_path)
    assert load_bundle(tmp_path / f"refusalscope-stage2-{pid}").set() == s2[pid]
    assert len(re.findall(r'download="refusalscope-stage2-[^"]+-apply\.py"', html)) == len(s2)
