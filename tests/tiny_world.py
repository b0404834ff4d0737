"""The planted tiny world written to disk as a user would have it: a model folder, SAELens
folders per layer, prompt files and a config that runs every stage in about a minute on a CPU,
and a whole pipeline run on it. Shared by the pipeline, backend, kill/resume, report and web-app
tests and the kill sweep benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from planted import save_planted_world


def write_tiny_world(root: str | Path, hydra: bool = False) -> Path:
    """Write the world under `root`; returns `root` (the config is `root/cfg.yaml`). `hydra`:
    the world with a dormant latent that wakes up (tests/planted_hydra.py), whose Stage 1 also
    reads layer 3, where that latent lives."""
    root = Path(root)
    build = {}
    if hydra:
        from planted_hydra import hydra_world

        build = {"build": hydra_world}
    threshold = save_planted_world(root, **build)  # six of the eight harmful prompts count as refused
    cfg = {"name": "tiny", "seed": 0,
           "model": {"source": str(root / "model"), "dtype": "float32", "device": "cpu", "batch_size": 8},
           "saes": {"source": "local", "path": str(root / "saes" / "layer_{layer}"), "layers": "all"},
           "data": {k: str(root / f"{'harmful' if 'harmful' in k else 'harmless'}.txt")
                    for k in ("harmful_train", "harmful_val", "harmful_test", "harmless_train",
                              "harmless_val", "harmless_test")},
           "judge": {"name": "first-token", "options": {"threshold": threshold},
                     "degenerate_is_jailbreak": True},
           "generation": {"max_new_tokens": 4, "batch_size": 16},
           "direction": {"n_val": 8, "max_kl": 100.0, "n_generate": 2, "random_controls": 1},
           "stage1": {"exclude_layers": [0], "k_start": 1, "k_step": 1, "k_max": 6},
           "stage2": {"block_size": 2, "taus": [0.05, 0.2, 0.5], "seeds": [0, 1, 2]},
           "stage3": {"harmful": [str(root / "harmful.jsonl")], "harmless": [str(root / "harmless.txt")],
                      "layers": [1, 2, 3], "ks": [1, 2, 4, 8], "probe_ks": [1, 4], "epochs": 3, "embedding_size": 4,
                      "collapse_sizes": [2], "batch_size": 4},
           "analyses": {"random_seeds": [0, 1], "obrien_ks": [1, 3], "ce_texts": 8,
                        "ce_instructions": str(root / "harmless.txt"), "ce_general": str(root / "harmless.txt"),
                        "taxonomy_prompts": [str(root / "harmful.jsonl")], "clamp_values": [2, 4],
                        "clamp_tokens": 2, "explain_texts": 12},
           "dashboards": {"texts": 24, "max_length": 48, "top_k": 4, "effect_prompts": 3}}
    if hydra:  # K = 2: Algorithm 1's blocks of 2 then visit every candidate
        cfg["stage1"].update(layers=[1, 2, 3], k_start=2)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def run_pipeline(world: Path, run_dir: Path) -> dict:
    """`refusalscope run` on the tiny world into `run_dir`; the CLI's JSON result."""
    from typer.testing import CliRunner

    from refusalscope.interfaces.cli import app

    res = CliRunner().invoke(app, ["run", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


def hostile_copy(run_dir: Path, dest: Path) -> tuple[Path, str]:
    """A copy of a run whose first refused prompt with a Stage 2 set, and every recorded reply, carry HTML/JS (model
    output and prompts are untrusted): pages must show it as text. Returns (copy, prompt id)."""
    import shutil

    shutil.copytree(run_dir, dest)
    kept = json.loads((dest / "filter" / "kept.json").read_text())
    with_set = {r["id"] for r in map(json.loads, (dest / "stage2" / "sets.jsonl").read_text().splitlines())
                if r.get("set")}
    first = next(i for i, k in enumerate(kept) if k["id"] in with_set)  # pages that show a Stage 2 set
    pid = kept[first]["id"]
    kept[first]["text"] = "Tell me " + XSS
    (dest / "filter" / "kept.json").write_text(json.dumps(kept))
    for rel in ("filter/completions.jsonl", "stage2/sets.jsonl"):
        rows = [json.loads(line) for line in (dest / rel).read_text().splitlines()]
        for r in rows:
            if "completion" in r:
                r["completion"] = "Sure: " + XSS
            for t in r.get("per_tau", []):
                t["completion"] = "Sure: " + XSS
        (dest / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    rerecord(dest, ["filter/kept.json", "filter/completions.jsonl", "stage2/sets.jsonl"])
    return dest, pid


def rerecord(run: Path, rels: list[str]) -> None:
    """Record the edited artifacts' sizes and hashes in the manifest, as a run that wrote them would
    (readers verify every finished artifact against the manifest)."""
    from refusalscope.run.store import RunStore

    RunStore(run, create=False).rerecord(rels)
