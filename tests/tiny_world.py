"""The planted tiny world written to disk as a user would have it: a model folder, SAELens
folders per layer, prompt files and a config that runs every stage in about a minute on a CPU.
Shared by the pipeline, backend and kill/resume tests and the kill sweep benchmark."""

from __future__ import annotations

from pathlib import Path

import yaml
from planted import save_planted_world


def write_tiny_world(root: str | Path) -> Path:
    """Write the world under `root`; returns `root` (the config is `root/cfg.yaml`)."""
    root = Path(root)
    threshold = save_planted_world(root)  # six of the eight harmful prompts count as refused
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
                        "clamp_tokens": 2, "explain_texts": 12}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root
