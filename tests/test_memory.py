"""Preflight memory (run/memory.py): the need is stated from config and header files, and a run
that cannot fit stops in one line before its first stage."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusalscope.errors import UserError
from refusalscope.run import memory
from refusalscope.run.preflight import model_info
from refusalscope.run.runner import open_context


def test_estimate_counts_model_saes_and_batch_from_files(tiny_world, tmp_path):
    ctx = open_context(str(tiny_world / "cfg.yaml"), tmp_path / "run", quiet=True)
    try:
        info = model_info(ctx.cfg)
        need = memory.estimate(ctx.cfg, info, info.hf_config, ["stage1"])
        model = AutoModelForCausalLM.from_pretrained(tiny_world / "model")
        assert need.parts["model"] == sum(p.numel() for p in model.parameters()) * 4
        saes = ctx.saes  # lazy: widths from the headers, the same numbers the weights have
        want = sum(saes[l].d_in * saes[l].d_sae * 2 * 4 + saes[l].d_sae * 8 for l in saes)
        assert need.parts[f"SAEs ({len(saes)} layers)"] == want
        assert need.parts["largest batch"] > 0 and need.device == "cpu"
        only_model = memory.estimate(ctx.cfg, info, info.hf_config, ["filter", "direction"])
        assert not any(k.startswith("SAEs") for k in only_model.parts)  # those stages read no SAE
        assert need.available == memory.available_bytes(torch.device("cpu")) or need.available > 0
    finally:
        ctx.close()


def test_a_run_that_does_not_fit_stops_in_one_line(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024.0)
    lines = []
    ctx = open_context(str(tiny_world / "cfg.yaml"), tmp_path / "run", quiet=True, log=lines.append)
    try:
        info = model_info(ctx.cfg)
        with pytest.raises(UserError, match=r"the run needs about .* GB on cpu but 0.0 GB are available .*"
                                            r"execution.memory_check: false") as err:
            memory.check_memory(ctx, info, ["stage1"])
        assert "\n" not in str(err.value)
        assert lines and lines[-1].startswith("memory: the run needs about")
        ctx.cfg.execution.memory_check = False
        assert memory.check_memory(ctx, info, ["stage1"]).total > 1024
    finally:
        ctx.close()


def test_sae_width_from_a_registry_id():
    class S:
        source, path, sae_id = "release", None, "layer_{layer}/width_65k/canonical"

    class C:
        saes = S()

    assert memory.sae_widths(C(), [3, 4]) == {3: (0, 65536), 4: (0, 65536)}
    S.sae_id = "layer_{layer}/width_16k/average_l0_71"
    assert memory.sae_widths(C(), [0]) == {0: (0, 16384)}
    S.sae_id = "layer_{layer}/canonical"
    assert memory.sae_widths(C(), [3]) is None
