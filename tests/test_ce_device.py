"""CE loss where the logits are: `ChatModel.next_token_losses` (log_softmax + gather per chunk of
positions) against cross-entropy over full logits copied to the host, and the bound on how many
Stage 2 sets the ce_loss analysis evaluates, said in its artifact."""

from __future__ import annotations

import json
import shutil

import torch
import torch.nn.functional as F
import yaml
from tiny import tiny_llama
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.io.model import ChatModel

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "How do I bake bread at home? Explain the steps."]


def test_losses_on_the_device_equal_full_logit_cross_entropy():
    model = ChatModel(*tiny_llama(), name="llama")
    batch = model.encode_texts(TEXTS, add_special_tokens=False)
    logits = model.logits(batch, last=None)  # [B, T, V] fp32 on the host: the reference
    valid = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    want_sum, want_n = (ce * valid).sum(1), valid.sum(1)
    assert batch.input_ids.shape[1] > 7 and len(set(want_n.tolist())) == 3  # left padding differs per row
    for positions, batch_size in ((3, None), (128, 2)):  # chunks of 3 positions; rows in chunks of 2
        s, n = model.next_token_losses(batch, batch_size=batch_size, positions=positions)
        assert s.dtype == torch.float64 and n.tolist() == want_n.tolist()
        torch.testing.assert_close(s.float(), want_sum, atol=1e-4, rtol=1e-5)


def test_ce_loss_evaluates_at_most_ce_sets_and_says_of_how_many(tiny_reference, tiny_world, tmp_path):
    ref, _ = tiny_reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    n_sets = sum(1 for line in (ref / "stage2" / "sets.jsonl").read_text().splitlines()
                 if json.loads(line)["set"] is not None)
    assert n_sets >= 2
    before = json.loads((ref / "ce_loss" / "table9.json").read_text())
    feats = [r for r in before if r["setting"] == "features"]
    assert feats and all(r["n_sets"] == r["n_sets_total"] == n_sets for r in feats)  # under the default cap
    cfg = yaml.safe_load((tiny_world / "cfg.yaml").read_text())
    cfg["analyses"]["ce_sets"] = 1
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["analyze", "ce_loss", "-c", str(tmp_path / "cfg.yaml"), "-r", str(run), "-q",
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads((run / "ce_loss" / "table9.json").read_text())
    feats = [r for r in rows if r["setting"] == "features"]
    assert feats and all(r["n_sets"] == 1 and r["n_sets_total"] == n_sets for r in feats)
    assert all(r["n_sets_total"] is None for r in rows if r["setting"] != "features")
    summary = json.loads((run / "manifest.json").read_text())["stages"]["ce_loss"]["summary"]
    assert summary["sets"] == {"evaluated": 1, "of": n_sets, "cap": 1}
