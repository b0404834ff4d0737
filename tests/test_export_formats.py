"""`refusalscope export --to neuronpedia|tables` and `--sets` on the tiny world: the Neuronpedia bodies
validate against JSON schemas written from Neuronpedia's source (tests/schemas), quick lists split at
150 latents and round-trip, the tables match the run's summaries, and sets are what the run found."""

from __future__ import annotations

import csv
import json
import shutil
from urllib.parse import parse_qs, urlparse

import jsonschema
import pytest
import yaml
from export_readback import schema
from typer.testing import CliRunner

from refusalscope.errors import UserError
from refusalscope.export import export
from refusalscope.export.neuronpedia import list_bodies, quick_lists
from refusalscope.export.selection import NamedSet, SAESource, select_sets
from refusalscope.interfaces.cli import app
from refusalscope.interventions.features import FeatureSet
from refusalscope.run.results import RunResults

GEMMA = "gemma-2-2b/{layer}-gemmascope-res-65k"


def with_neuronpedia(tiny_run, tmp_path, np_id=GEMMA):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["saes"]["neuronpedia_id"] = np_id
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_neuronpedia_bodies_validate_and_carry_our_numbers(tiny_run, tmp_path):
    run = with_neuronpedia(tiny_run, tmp_path)
    out = export(run, "neuronpedia", tmp_path / "np", sets=["stage2", "core@2"])
    assert out["files"] == ["quick_lists.md", "lists.json", "vector.json"]
    res = RunResults(tiny_run)
    s2 = {pid: fs for pid, fs in res.stage2_sets().items() if len(fs)}
    bodies = json.loads((tmp_path / "np" / "lists.json").read_text())
    assert len(bodies) == len(s2) + 1
    expl = res.explanations()
    for body in bodies:
        jsonschema.validate(body, schema("list"))
        for f in body["features"]:
            assert f["modelId"] == "gemma-2-2b"
            layer = int(f["layer"].split("-")[0])
            assert f["layer"] == f"{layer}-gemmascope-res-65k"
            fid = f"{layer}-{f['index']}"
            n = sum(fid in fs.ids() for fs in s2.values())
            assert f"in {n} of {len(s2)} Stage 2 sets" in f["description"]
            assert expl[fid] in f["description"]
    first = next(b for b in bodies if b["name"].startswith("refusalscope stage2/"))
    pid = first["name"].removeprefix("refusalscope stage2/")
    assert first["testText"] == next(p.text for p in res.kept_prompts() if p.id == pid)

    vector = json.loads((tmp_path / "np" / "vector.json").read_text())
    jsonschema.validate(vector, schema("vector"))
    _, layer = res.direction()
    assert vector["layerNumber"] == layer and vector["vector"] == pytest.approx(res.direction_vector().tolist())

    links = (tmp_path / "np" / "quick_lists.md").read_text().splitlines()[2:]
    assert len(links) == len(s2) + 1
    url = links[0][links[0].index("(") + 1:links[0].rindex(") (")]
    q = parse_qs(urlparse(url).query)
    feats = json.loads(q["features"][0])
    jsonschema.validate(feats, schema("quick_list"))
    assert FeatureSet((int(f["layer"].split("-")[0]), int(f["index"])) for f in feats) in s2.values()


def test_large_sets_split_at_neuronpedias_limits():
    src = SAESource("release", "google/gemma-2-2b-it", release="r", sae_id="s", neuronpedia_id=GEMMA)
    ns = NamedSet("big", FeatureSet((12, i) for i in range(320)), "a big set")
    quick = quick_lists(ns, src)
    assert [q["n"] for q in quick] == [150, 150, 20]
    assert [q["name"] for q in quick] == ["refusalscope big (1/3)", "refusalscope big (2/3)", "refusalscope big (3/3)"]
    back = [json.loads(parse_qs(urlparse(q["url"]).query)["features"][0]) for q in quick]
    assert [int(f["index"]) for part in back for f in part] == list(range(320))
    for part in back:
        jsonschema.validate(part, schema("quick_list"))
    bodies = list_bodies(ns, src, {}, "hi")
    assert [len(b["features"]) for b in bodies] == [100, 100, 100, 20]
    for b in bodies:
        jsonschema.validate(b, schema("list"))
    with pytest.raises(jsonschema.ValidationError):  # the schema does hold the limit
        jsonschema.validate({**bodies[0], "features": bodies[0]["features"] * 2}, schema("list"))


def test_local_saes_get_a_note_not_dead_links(tiny_run, tmp_path):
    res = CliRunner().invoke(app, ["export", str(tiny_run), "--to", "neuronpedia", "-o", str(tmp_path / "np")])
    assert res.exit_code == 0, res.output
    assert "no public Neuronpedia pages" in res.stdout
    assert sorted(p.name for p in (tmp_path / "np").iterdir()) == ["README.md"]


def test_tables_are_the_runs_tables_as_csv_and_latex(tiny_run, tmp_path):
    out = export(tiny_run, "tables", tmp_path / "t")
    res = RunResults(tiny_run)
    t1 = tmp_path / "t" / "stage2__table_1_jailbreak_statistics_after_stage_2.csv"
    (row,) = list(csv.DictReader(t1.open()))
    s = res.summary("stage2")
    assert row["unique latents"] == str(s["unique_latents"])
    assert row["jailbroken / refused"] == f"{s['jailbroken']} / {s['refused']}"
    tex = (tmp_path / "t" / "stage2__table_1_jailbreak_statistics_after_stage_2.tex").read_text()
    assert r"\caption{Table 1: jailbreak statistics after Stage 2}" in tex and r"\toprule" in tex
    assert "unique latents & jailbroken / refused" in tex
    assert sum(n.endswith(".tex") for n in out["files"]) >= 3  # Tables 1, 2, 9 at least
    assert not any(n.startswith("direction") and n.endswith(".tex") for n in out["files"])
    assert out["notes"] == ["no eval matrix: `refusalscope eval` has not run on this run directory"]


def test_sets_are_what_the_run_found(tiny_run):
    res = RunResults(tiny_run)
    s2 = {pid: fs for pid, fs in res.stage2_sets().items() if len(fs)}
    assert {s.name: s.features for s in select_sets(res, None)} == {f"stage2/{p}": fs for p, fs in s2.items()}
    counts: dict = {}
    for fs in s2.values():
        for f in fs:
            counts[f] = counts.get(f, 0) + 1
    top = max(counts.values())
    (core,) = select_sets(res, ["core@1"])
    assert counts[core.features[0]] == top
    pid = next(iter(s2))
    (one,) = select_sets(res, [pid])
    assert one.name == f"stage2/{pid}" and one.features == s2[pid]
    stage1 = select_sets(res, ["stage1"])
    assert {s.name for s in stage1} == {f"stage1/{p}" for p, fs in res.stage1_sets().items() if len(fs)}
    with pytest.raises(UserError, match="unknown set 'nope'"):
        select_sets(res, ["nope"])
    with pytest.raises(UserError, match="core@K"):
        select_sets(res, ["core@0"])


def test_written_safetensors_are_readable_like_every_other_file(tmp_path):
    """safetensors replaces the temp file it is given, which used to leave exports (and run artifacts)
    at mode 0600 while JSON beside them got the umask's mode."""
    import os

    import torch

    from refusalscope.artifacts import atomic_write_json, atomic_write_tensors

    umask = os.umask(0)
    os.umask(umask)
    atomic_write_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    atomic_write_json(tmp_path / "t.json", {})
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o666 & ~umask
