"""Rows: the config file itself and the values of closed sets it holds."""

from __future__ import annotations

from .core import RUN, Row, cfg

GROUPS: dict[str, list[Row]] = {
    "the config file": [
        Row("config-unknown-key", "config with an unknown key", RUN,
            "{cfg}: unknown key 'model.sorce': remove it or check its spelling", cfg(model={"sorce": "x"})),
        Row("config-wrong-type", "config value of the wrong type", RUN,
            "{cfg}: 'model.batch_size': Input should be a valid integer, unable to parse string as an integer "
            "(got 'big'): fix this value", cfg(model={"batch_size": "big"})),
        Row("config-negative-k", "negative K", RUN,
            "{cfg}: 'stage1.k_start': Input should be greater than or equal to 1 (got -10): fix this value",
            cfg(stage1={"k_start": -10})),
        Row("config-k-ladder", "K ladder that ends before it starts", RUN,
            "{cfg}: 'stage1': k_max (5) is below k_start (10): raise k_max or lower k_start",
            cfg(stage1={"k_start": 10, "k_max": 5})),
        Row("config-tau-range", "τ outside (0, 1]", RUN,
            "{cfg}: 'stage2.taus.1': τ = 1.5 is outside (0, 1]: use thresholds above 0 and at most 1",
            cfg(stage2={"taus": [0.5, 1.5]})),
        Row("config-tau-empty", "empty τ list", RUN,
            "{cfg}: 'stage2.taus': the list is empty: give at least one value", cfg(stage2={"taus": []})),
        Row("config-block-size", "block size 0", RUN,
            "{cfg}: 'stage2.block_size': Input should be greater than or equal to 1 (got 0): fix this value",
            cfg(stage2={"block_size": 0})),
        Row("config-judge-option", "judge option out of range", RUN,
            "first-token threshold 1.5 is outside (0, 1): pick e.g. 0.5", cfg(judge={"options": {"threshold": 1.5}})),
        Row("config-not-yaml", "config file that is not YAML", RUN,
            "{cfg}: not valid YAML (while parsing a flow sequence): fix the syntax",
            lambda c: c.extra.update(raw="model: [1, 2\n"), given='model: [1, 2'),
        Row("config-missing", "config file that does not exist", "run -c {tmp}/nope.yaml -r {run} -q",
            "config file {tmp}/nope.yaml not found: pass a YAML file or one of the presets "
            "(demo, gemma-2-2b-it, gemma-2-2b-it-16k, llama-3.1-8b-it)"),
        Row("config-empty", "empty config file (it once ran the demo preset)", RUN,
            "{cfg}: the config file is empty: write the settings to change (e.g. preset: demo), or pass a preset "
            "name with -c", lambda c: c.extra.update(raw="\n"), given="(an empty file)"),
        Row("config-not-mapping", "config file that is a list, not sections", RUN,
            "{cfg}: the top level must be a mapping of sections: fix the file",
            lambda c: c.extra.update(raw="- model\n- saes\n"), given="- model\n- saes"),
    ],
    # every field whose values form a closed set rejects anything else when the config is read
    "closed sets": [
        Row("closed-dtype", "dtype that does not exist", RUN,
            "{cfg}: 'model.dtype': Input should be 'auto', 'float32', 'fp32', 'bfloat16', 'bf16', 'float16' or 'fp16' "
            "(got 'float7'): fix this value", cfg(model={"dtype": "float7"})),
        Row("closed-device-name", "device name that is no device", RUN,
            "{cfg}: 'model.device': device 'gpu0' is not one of auto, cpu, cuda, cuda:N, mps: fix model.device",
            cfg(model={"device": "gpu0"})),
        Row("closed-device-absent", "GPU this machine does not have", RUN,
            "model.device is 'cuda:7' but this machine has {*}", cfg(model={"device": "cuda:7"})),
        Row("judge-unknown", "unknown judge", RUN, "{cfg}: 'judge.name': unknown judge 'gpt-judge': use one of {*}",
            cfg(judge={"name": "gpt-judge"})),
        Row("closed-first-pass", "unknown first-pass judge", RUN,
            "{cfg}: 'judge.first_pass': unknown judge 'quick': use one of {*}", cfg(judge={"first_pass": "quick"})),
        Row("closed-harmless-judge", "unknown over-refusal judge", RUN,
            "{cfg}: 'eval.harmless_judge': unknown judge 'human': use one of {*}", cfg(eval={"harmless_judge": "human"})),
        Row("closed-sae-source", "unknown SAE source", RUN,
            "{cfg}: 'saes.source': Input should be 'demo', 'release' or 'local' (got 'hub'): fix this value",
            cfg(saes={"source": "hub"})),
        Row("closed-analysis", "unknown analysis in the config", RUN,
            "{cfg}: 'analyses.run.1': Input should be 'hydra', 'stage3_only', 'controls', 'ce_loss', 'taxonomy', "
            "'clamping' or 'semantics' (got 'magic'): fix this value", cfg(analyses={"run": ["hydra", "magic"]})),
        Row("closed-eval-intervention", "unknown eval intervention", "eval -c {cfg} -r {run} -q --interventions core,magic",
            "command-line options: 'eval.interventions.1': Input should be 'none', 'direction', 'actadd', 'core', 'core_category', "
            "'stage2_union', 'critical_union', 'random' or 'bos_clamp' (got 'magic'): fix this value"),
        Row("closed-backend", "unknown backend in the config", RUN,
            "{cfg}: 'execution.backend': Input should be 'local' or 'ray' (got 'dask'): fix this value",
            cfg(execution={"backend": "dask"})),
    ],
}
