"""`refusalscope report` on a real tiny run: every section, offline (no external URL, no
script), hostile prompt/reply text escaped, and missing stages stated rather than failing."""

import json
import re
import shutil

from tiny_world import XSS, hostile_copy
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.interfaces.report import build_report
from refusalscope.interfaces.views import SECTIONS
from refusalscope.run.results import RunResults

EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:|//)|url\(\s*["']?\s*(?:https?:|//)""", re.I)


def test_report_has_every_section_and_works_offline(tiny_run, tmp_path):
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(tiny_run), "-o", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text(encoding="utf-8")
    for sid, *_ in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    r = RunResults(tiny_run)
    for p in r.kept_prompts():
        assert f'id="prompt-{p.id}"' in html
    for f in r.critical_features():
        assert f'id="latent-{f.id}"' in html
    ran = [sid for sid, *_ in SECTIONS if f"The `{sid}` stage did not run" in html]
    assert ran == ["eval"]  # the tiny run ran every stage of `run`; eval runs only when asked for
    assert not EXTERNAL.search(html) and "<script" not in html.lower() and "<link" not in html.lower()
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) >= 6 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "Table 1" in html and "Table 2" in html and "Table 9" in html


def test_report_escapes_hostile_prompts_and_replies(tiny_run, tmp_path):
    run, pid = hostile_copy(tiny_run, tmp_path / "run")
    html = build_report(run)
    assert XSS not in html and "<script>window.__xss" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert f'id="prompt-{pid}"' in html


def test_missing_stages_are_stated_not_fatal(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("stage3", "hydra", "controls", "dashboards", "semantics", "taxonomy"):
        del manifest["stages"][stage]
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "hydra")  # and an artifact gone for good
    html = build_report(run)
    for stage in ("stage3", "hydra", "controls", "dashboards", "semantics", "taxonomy"):
        assert f"The `{stage}` stage did not run" in html, stage
    assert '<section id="stage2">' in html and "Table 1" in html


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: no run found") and len(res.output.strip().splitlines()) == 1


def test_eval_section_shows_the_matrix_once_eval_ran(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = CliRunner().invoke(app, ["eval", "-c", str(tiny_run.parent / "cfg.yaml"), "-r", str(run), "-q",
                                   "--datasets", "search,harmless", "--interventions", "none,direction,core,random"])
    assert res.exit_code == 0, res.output
    html = build_report(run)
    section = html.split('<section id="eval">')[1].split("</section>")[0]
    assert "did not run" not in section and "Per intervention" in section
    rows = {r["intervention"] for r in RunResults(run).summary("eval")["rows"]}
    assert {"none", "direction"} <= rows and all(name.split(" = ")[0] in section for name in rows)
    assert section.count('<img src="data:image/png;base64,') >= 2  # heatmap and trade-off at least
