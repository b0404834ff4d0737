"""The public Python API on the planted tiny world: `import refusalscope as rs` gives the same
numbers as the methods the pipeline runs, and examples/quickstart.py runs end to end."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from planted import HARMFUL, HARMLESS, save_planted_world

import refusalscope as rs
from refusalscope.interventions.engine import intervene

ROOT = Path(__file__).resolve().parents[1]
N_PLANTED = 3  # planted_world's n_planted: latents 0..2 of every layer carry the refusal component


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    threshold = save_planted_world(root)
    model = rs.load_model(root / "model", dtype="float32", device="cpu")
    saes = rs.load_saes(str(root / "saes" / "layer_{layer}"), model=model)
    return root, threshold, model, saes


def test_surface_is_lazy_and_documented():
    names = set(rs.__all__) - {"__version__"}
    assert {"load_model", "load_saes", "generate", "stage1", "stage2", "stage3", "open_run", "run"} <= names
    for name in names:
        assert getattr(rs, name).__doc__, name  # every public name says what it is for
    with pytest.raises(AttributeError):
        rs.not_a_name  # noqa: B018


def test_run_stays_callable_once_the_run_package_is_imported(tmp_path):
    import refusalscope.run.config  # noqa: F401  binds refusalscope.run to the package

    with pytest.raises(rs.UserError, match="unknown stage 'nope'"):
        rs.run("demo", tmp_path / "r", upto="nope", quiet=True)


def test_generate_and_probability_apply_the_engine(world):
    _, _, model, saes = world
    feats = rs.FeatureSet(["1-0", "2-0", "3-0"])
    with intervene(model, saes, shared=feats.plan()):
        want = model.generate(model.encode(HARMFUL[:3]), max_new_tokens=4)
    assert rs.generate(model, HARMFUL[:3], saes, ablate=feats, max_new_tokens=4) == want
    plain = rs.refusal_probability(model, HARMFUL, saes)
    ablated = rs.refusal_probability(model, HARMFUL, saes, ablate=feats)
    assert (ablated < plain).all()  # the planted latents carry the refusal component
    clamp = rs.plan(clamp={"2-0": 5.0, (3, 0): 5.0})[0]
    assert clamp.values == {2: {0: 5.0}, 3: {0: 5.0}} and clamp.positions == (0,)
    with pytest.raises(rs.UserError, match="layer-index"):
        rs.plan(ablate=["2_0"])


def test_method_functions_find_the_planted_mechanism(world):
    root, threshold, model, saes = world
    judge = rs.make_judge("first-token", degenerate_is_jailbreak=True, threshold=threshold)
    choice = rs.find_direction(model, HARMFUL, HARMLESS, val_harmful=HARMFUL, val_harmless=HARMLESS,
                               judge=judge, max_kl=100.0, n_generate=2, max_new_tokens=2, batch_size=8)
    assert abs(choice.direction.norm().item() - 1) < 1e-5
    records, cands = rs.stage1(model, saes, HARMFUL, choice, judge, layers=[1, 2, 3], ks=[1, 2, 3],
                               max_new_tokens=2)
    assert set(cands) == {r.id for r in records if r.k is not None} and len(cands) >= 3
    assert all(len(cands[r.id]) == 3 * r.k for r in records if r.k is not None)  # top-K of 3 layers
    # the planted latents (indices < N_PLANTED at every layer, decoder along r̂_l) align best
    assert all(f.index < N_PLANTED for s in cands.values() for f in s)
    sets = rs.stage2(model, saes, HARMFUL, cands, judge, block_size=1, taus=[0.05, 0.5], max_new_tokens=2)
    assert [r.id for r in sets] == sorted(cands, key=lambda pid: int(pid[1:]))
    for r in sets:
        if r.set is not None:
            assert set(r.set) <= set(cands[r.id]) and sorted(r.active | r.inactive) == sorted(r.set)
    found = [r.set for r in sets if r.set is not None]
    assert found and all(f.index < N_PLANTED for s in found for f in s)  # Stage 2 keeps planted latents only


def test_quickstart_runs_on_the_tiny_world(world):
    root, threshold, _, _ = world
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--model", str(root / "model"),
         "--saes", str(root / "saes" / "layer_{layer}"), "--harmful", str(root / "harmful.txt"),
         "--harmless", str(root / "harmless.txt"), "--judge", "first-token", "--threshold", str(threshold),
         "--ks", "1", "2", "3", "-n", "3", "--degenerate-ok"],
        capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
                                                          "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refusal direction: layer ")
    assert lines[1].startswith("Stage 1 K per prompt:")
    ks = ast.literal_eval(lines[1].split(":", 1)[1].strip())
    assert set(ks) == {"harmful-2", "harmful-4", "harmful-6"} and any(k is not None for k in ks.values())
    sets = [l for l in lines if "minimal set" in l]
    assert len(sets) == sum(k is not None for k in ks.values())
    assert any("plain:" in l for l in lines) == any("minimal set [" in l for l in sets)


@pytest.mark.integration
def test_quickstart_runs_on_the_demo_world():
    from refusalscope.demo.world import is_built

    if not is_built():
        pytest.skip("the demo world is not built (make demo builds it); the tiny-world run above covers CI")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "-n", "2"], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refusal direction: layer ")
    ks = ast.literal_eval(lines[1].split(":", 1)[1].strip())
    assert len(ks) == 2 and any(k is not None for k in ks.values())  # the demo's refusals do break
    # Algorithm 1 may keep no faithful set on the demo world (ΔP("I") is spread thin over 8 × 28
    # latents); each prompt Stage 1 broke gets its line, and a set found is shown ablated
    sets = [l for l in lines if "minimal set" in l]
    assert len(sets) == sum(k is not None for k in ks.values())
    assert sum("plain:" in l for l in lines) == sum("minimal set [" in l for l in sets)
