"""Smoke tests of the GPU-sized benchmark at tiny sizes: the script a lent GPU runs must work
before it gets there (no timing is asserted: speed lives in benchmarks/, not in tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _bench_shapes():
    return load_benchmark("bench_shapes")


def test_bench_shapes_small_reports_every_mode_and_size(tmp_path):
    out = tmp_path / "b4.json"
    res = _bench_shapes().main(["--small", "--arch", "llama-3.1-8b", "--d-sae", "128", "--dtype", "float32",
                                "--device", "cpu", "--sizes", "3", "9", "--repeats", "1", "--batch", "4",
                                "--gen-batch", "2",
                                "--gen-tokens", "3", "--stage2-k", "3", "--literal-budget-s", "30",
                                "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert [(r["mode"], r["S_per_layer"]) for r in res["rows"]] == \
        [("plain", 0), ("sparse", 3), ("reference", 3), ("sparse", 9), ("reference", 9),
         ("generate", 0), ("generate+sparse", 9)]
    assert all(r["median_s"] > 0 for r in res["rows"]) and res["layers"] == 4
    assert all("reference_over_sparse" in r for r in res["rows"] if r["mode"] == "reference")
    s2 = res["stage2"]  # B2 at these shapes: pool = top-3 at layers 2..3, every (τ, seed) run literally
    assert s2["pool"] == 6 and s2["identical_sets"] and s2["literal_runs_timed"] == "24/24"
    assert s2["literal_passes"] == 2 * (6 // 5) * 24 and s2["batched_rows"] == 3 * (6 // 5 + 1)


def test_projection_multiplies_measured_row_costs(tmp_path):
    spec = importlib.util.spec_from_file_location("proj", ROOT / "benchmarks" / "project_paper_run.py")
    proj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proj)
    res = {"arch": "gemma-2-2b", "d_sae": 16, "layers": 26, "device": "x", "batch": 10,
           "rows": [{"mode": "sparse", "S_per_layer": 10, "median_s": 1.0},
                    {"mode": "generate+sparse", "S_per_layer": 10, "median_s": 8.0, "batch": 4},
                    {"mode": "generate+sparse", "S_per_layer": 10, "median_s": 10.0, "batch": 10}],
           "stage2": {"batched_s": 2.0, "batched_rows": 10}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    out = proj.main([str(tmp_path / "r.json"), "--prompts", "10"])
    assert out["costs"] == {"forward_row_s": 0.1, "generated_row_s": 1.0, "gen_batch": 10, "stage2_row_s": 0.2}
    stage1 = next(s for s in out["stages"] if s["stage"] == "stage1")
    assert stage1["generated_rows"] == 60 and abs(stage1["hours"] - 60 / 3600) < 1e-9
    assert abs(out["total_hours"] - sum(s["hours"] for s in out["stages"])) < 1e-9


def test_gpu_script_says_what_is_missing_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the script runs the real benchmark instead")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "--small" in res.stderr


def _bench(name):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return root, _bench("planted_world").build_world(root, "gemma-2-2b", small=True, log=lambda *_: None)


def test_planted_world_refuses_harmful_prompts_and_flips_when_planted_latents_go(small_world):
    root, info = small_world
    c = info["check"]
    assert c["harmful_refused"] > c["harmless_refused"] + 0.2 and c["flipped_of_refused"] >= 0.8
    assert c["p_ablated_median"] < c["threshold"] <= c["p_harmful_median"]
    target = min(64, info["d_sae"] // 8)  # random latents as sparse as the builder aims for
    assert target / 2 <= info["l0_mean"]["all"] <= 2 * target and info["l0_mean"]["last"] <= 2 * target
    from refusalscope.io.sae_loading import load_sae_set
    from refusalscope.run.config import load_config

    cfg = load_config(str(root / "config.yaml"))  # the gemma-2-2b-it preset pointed at the world
    assert cfg.stage1.k_max == 200 and cfg.stage3.ks[-1] == 2000 and cfg.judge.name == "first-token"
    saes = load_sae_set(cfg.saes.path, range(info["layers"]), quiet=True)  # Gemma Scope params.npz
    planted = json.loads((root / "world.json").read_text())
    assert saes[2].d_sae == info["d_sae"] and planted == info


def test_planted_world_writes_llama_scope_checkpoints(tmp_path):
    info = _bench("planted_world").build_world(tmp_path, "llama-3.1-8b", small=True, d_sae=64, n_planted=4,
                                               log=lambda *_: None)
    from refusalscope.io.sae_loading import load_sae_set

    assert (tmp_path / "saes" / "llama_scope_lxr_8x" / "l3r_8x" / "checkpoints" / "final.safetensors").exists()
    saes = load_sae_set(str(tmp_path / "saes" / "llama_scope_lxr_8x" / "l{layer}r_8x"), range(4), quiet=True)
    assert saes[3].d_sae == 64 and info["check"]["flipped_of_refused"] >= 0.5


def test_planted_pipeline_small_measures_every_stage(small_world, tmp_path):
    root, _ = small_world
    out = tmp_path / "b6.json"
    analyses = ["hydra", "stage3_only", "controls", "ce_loss", "taxonomy", "clamping", "semantics"]
    res = _bench("bench_planted_pipeline").main(["--small", "--world", str(root), "--prompts", "6",
                                                 "--run", str(tmp_path / "run"), "--out", str(out),
                                                 "--analyses", *analyses])
    assert json.loads(out.read_text())["stage_total_s"] == res["stage_total_s"]
    stages = [r["stage"] for r in res["stages"]]
    assert stages == ["filter", "direction", "stage1", "stage2", "stage3", *analyses, "dashboards"]
    by = {r["stage"]: r for r in res["stages"]}
    assert by["filter"]["fwd_rows"] == 6 and by["filter"]["gen_rows"] == 6  # the first-token judge's pass
    assert by["stage2"]["fwd_rows"] > 0 and by["stage1"]["gen_rows"] > 0
    assert by["stage1"]["summary"]["jailbroken"] >= 1  # the planted latents flip refused prompts
    n = res["prompts_refused"]
    assert by["stage2"]["scaled_521_s"] == pytest.approx(by["stage2"]["seconds"] / n * 521, rel=0.02, abs=0.2)
    assert by["direction"]["scaled_521_s"] == pytest.approx(by["direction"]["seconds"], abs=0.06)  # fixed: not scaled


def test_stage3_width_benchmark_small_runs_each_width_in_its_own_process(tmp_path):
    spec = importlib.util.spec_from_file_location("b13", ROOT / "benchmarks" / "bench_stage3_width.py")
    b13 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b13)
    out = tmp_path / "b13.json"
    res = b13.main(["--small", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    lo, hi = res["rows"]
    assert (lo["d_sae"], hi["d_sae"]) == (256, 512) and lo["rows"] == hi["rows"] == 2 * 20 * 4
    for r in res["rows"]:  # 8 latents per token and layer (fewer where a draw repeats) + the planted ones
        assert r["nnz"] <= r["rows"] * 3 * 8 + 8 * r["rows"] // 2 and r["nnz"] > r["rows"] * 3 * 6
        assert r["fm_columns"] <= r["latents_seen"] <= r["d_sae"] * 3 and r["peak_rss_gb"] > 0
    assert res["ratios"]["width"] == 2.0 and res["ratios"]["nnz"] == round(hi["nnz"] / lo["nnz"], 2)


def test_wide_pipeline_table_keeps_every_width_and_the_commentary(tmp_path):
    """B11's README is rewritten after every stage: another width's row and the hand-written
    analysis beside the table must survive it, and the ratio is widest over narrowest."""
    wide = load_benchmark("bench_wide_pipeline")
    out = tmp_path / "pipeline.json"
    out.write_text(json.dumps({"runs": {}, "commentary": "## Why\n\nbecause."}))

    def run(d_sae, seconds):
        return {"d_sae": d_sae, "n_layers": 20, "n_prompts": 146, "n_refused": 94, "note": "idle",
                "stages": {"stage3": {"seconds": seconds, "peak_rss_gb": 2.0, "exit": 0}},
                "stages_finished": ["stage3"]}

    wide._save(run(16384, 90.0), out)
    wide._save(run(65536, 135.0), out)
    text = (tmp_path / "README.md").read_text()
    assert "| stage3 | 90 | 2.00 | 135 | 2.00 | 1.50 |" in text
    assert text.rstrip().endswith("because.")
    assert sorted(json.loads(out.read_text())["runs"]) == ["16384", "65536"]


def test_bench_dashboards_grouped_passes_give_the_same_dashboards_in_fewer_forwards(tiny_run, tmp_path):
    out = tmp_path / "b15.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dashboards.py"), "--run", str(tiny_run),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    per_layer, grouped = res["rows"]
    assert res["identical"] and per_layer["latents"] == grouped["latents"] > 0
    assert per_layer["passes"] == per_layer["layers"] >= 2 and grouped["passes"] == 1
    assert grouped["forward_calls"] < per_layer["forward_calls"]
