"""SAE I/O: FeatureDictionary math == SAELens, SAELens / Gemma Scope / Llama Scope folders,
save round trip, SAESet checks and error paths. Real SAELens objects, real files, random weights."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sae_lens
import torch
from packaging.version import Version
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as sl_loaders
from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
from safetensors.torch import save_file

from refusalscope.errors import UserError
from refusalscope.interventions.features import Feature, FeatureSet
from refusalscope.io.sae_loading import load_sae, load_sae_set
from refusalscope.io.saes import (
    FeatureDictionary,
    SAESet,
    make_jumprelu_sae,
    make_relu_sae,
    make_topk_sae,
    save_sae,
)

D_IN, D_SAE = 16, 48


def weights(seed: int, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5 * 3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
        "threshold": torch.rand(d_sae, generator=g) * 0.6,
    }


def inputs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5


def jumprelu(seed=0, layer=3, apply_b_dec=False):
    return make_jumprelu_sae(**weights(seed), hook_name=f"blocks.{layer}.hook_resid_post",
                             model_name="tiny", apply_b_dec_to_input=apply_b_dec)


def topk(seed=1, layer=3, k=5, **kw):
    w = weights(seed)
    del w["threshold"]
    return make_topk_sae(**w, k=k, hook_name=f"blocks.{layer}.hook_resid_post", **kw)


def relu(seed=2, layer=3, apply_b_dec=True):
    w = weights(seed)
    del w["threshold"]
    return make_relu_sae(**w, hook_name=f"blocks.{layer}.hook_resid_post",
                         apply_b_dec_to_input=apply_b_dec)


def assert_same_as_saelens(sae: SAE, fd: FeatureDictionary, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = sae.encode(x)
        torch.testing.assert_close(fd.encode(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fd.decode(ref), sae.decode(ref), rtol=1e-5, atol=1e-5)
    assert (ref > 0).any() and (ref == 0).any()  # the test exercises both branches


@pytest.mark.parametrize(
    "build,arch",
    [
        (partial(jumprelu, apply_b_dec=False), "jumprelu"),
        (partial(jumprelu, apply_b_dec=True), "jumprelu"),
        (topk, "topk"),
        (partial(topk, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True), "topk"),
        (partial(relu, apply_b_dec=True), "relu"),
        (partial(relu, apply_b_dec=False), "relu"),
    ],
)
def test_feature_dictionary_matches_saelens(build, arch):
    sae = build()
    fd = FeatureDictionary.from_sae(sae)
    assert (fd.architecture, fd.layer, fd.hook_name) == (arch, 3, "blocks.3.hook_resid_post")
    assert (fd.d_in, fd.d_sae) == (D_IN, D_SAE)
    assert fd.apply_b_dec_to_input == sae.cfg.apply_b_dec_to_input
    x = inputs(7, 4, 9)
    assert_same_as_saelens(sae, fd, x)
    if arch == "topk":
        assert fd.k == 5
        assert ((fd.encode(x) > 0).sum(-1) <= 5).all()
    else:
        assert fd.k is None
    if arch == "relu":
        assert torch.equal(fd.threshold, torch.zeros(D_SAE))


def test_encode_subset_equals_full_encode_columns():
    fd = FeatureDictionary.from_sae(jumprelu(apply_b_dec=True))
    x = inputs(3, 6)
    idx = [0, 5, 17, 47]
    torch.testing.assert_close(fd.encode_subset(x, idx), fd.encode(x)[:, idx])


def test_to_dtype_and_unit_decoder():
    fd = FeatureDictionary.from_sae(jumprelu())
    half = fd.to(dtype=torch.float64)
    assert half.W_enc.dtype == torch.float64 and half.layer == fd.layer
    assert fd.to() is fd
    torch.testing.assert_close(fd.unit_decoder().norm(dim=-1), torch.ones(D_SAE))


def test_feature_id_codec():
    assert str(Feature(12, 1234)) == "12-1234" and Feature.of("12-1234") == (12, 1234)
    assert Feature.of((12, 7)) == Feature.of([12, 7]) == Feature.of(Feature(12, 7)) == Feature(12, 7)
    for bad in ("12_1234", "12-", "-3", (1, 2, 3), ("a", 1), (-1, 4), "12-x"):
        with pytest.raises(UserError, match="layer-index"):
            Feature.of(bad)
    s = FeatureSet(["3-1", (1, 9), Feature(1, 2), "3-1"])
    assert s.ids() == ["3-1", "1-9", "1-2"] and s.sorted().ids() == ["1-2", "1-9", "3-1"]
    assert s.by_layer() == {1: [2, 9], 3: [1]} and FeatureSet.from_layers(s.by_layer()) == s.sorted()
    assert "1-9" in s and (1, 9) in s and "2-2" not in s and (s - ["1-9"]).ids() == ["3-1", "1-2"]
    assert (s | ["0-0"]).ids()[-1] == "0-0" and hash(s) == hash(FeatureSet(s)) and s[1:] == FeatureSet(s.ids()[1:])
    (abl,) = s.plan(positions="prompt")
    assert abl.features == {1: (2, 9), 3: (1,)} and abl.positions == "prompt" and FeatureSet().plan() == []
    assert s.clamp(4.0).values == {1: {2: 4.0, 9: 4.0}, 3: {1: 4.0}} and s.clamp(4.0).positions == (0,)


def test_save_round_trips_through_saelens(tmp_path):
    sae = jumprelu(apply_b_dec=True)
    folder = save_sae(sae, tmp_path / "sae")
    save_sae(sae, folder)  # overwriting an existing folder works and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == sae_lens.__version__
    assert Version(cfg["metadata"]["sae_lens_version"]) >= Version("6.0.0")
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny"
    back = SAE.load_from_disk(folder)
    assert back.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0)
    x = inputs(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    loaded, fd = load_sae(folder)
    assert fd.layer == 3 and loaded.cfg.apply_b_dec_to_input
    assert_same_as_saelens(sae, fd, x)


def test_save_keeps_metadata_of_an_sae_loaded_from_a_legacy_cfg(tmp_path):
    # a pre-6.0 cfg.json: SAELens puts its old version into metadata, which would make a
    # plain save_model() folder load as legacy again; save_sae writes the current version.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    sae = topk()
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()},
              legacy / "sae_weights.safetensors")
    (legacy / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
        "activation_fn_kwargs": {"k": 5}, "hook_point": "blocks.3.hook_resid_post",
        "model_name": "tiny", "sae_lens_version": "5.9.1", "apply_b_dec_to_input": False,
    }))
    old, _ = load_sae(legacy)
    saved = save_sae(old, tmp_path / "new")
    back = SAE.load_from_disk(saved)
    assert back.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert back.cfg.metadata.model_name == "tiny"


# ---------------------------------------------------------------- Gemma Scope


def write_gemma_scope(folder: Path, seed: int) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    arrays = {k: v.numpy() for k, v in weights(seed).items()}
    np.savez(folder / "params.npz", **arrays)
    return arrays


def test_gemma_scope_folder_matches_saelens_converter(tmp_path, monkeypatch):
    sae_id = "layer_3/width_16k/average_l0_59"
    root = tmp_path / "gemma-scope-2b-pt-res"
    arrays = write_gemma_scope(root / sae_id, seed=11)

    def fake_download(repo_id, filename, subfolder=None, **_):
        assert repo_id == "google/gemma-scope-2b-pt-res"
        return str(root / (f"{subfolder}/{filename}" if subfolder else filename))

    monkeypatch.setattr(sl_loaders, "hf_hub_download", fake_download)

    def converter(repo_id, folder_name, device, force_download, cfg_overrides):
        # SAELens takes d_in/d_sae from the repo name (2304 x 16384): shrink to the test's size
        overrides = {**(cfg_overrides or {}), "d_in": D_IN, "d_sae": D_SAE}
        return sl_loaders.gemma_2_sae_huggingface_loader(
            repo_id, folder_name, device, force_download, overrides)

    ref = SAE.from_pretrained("gemma-scope-2b-pt-res", sae_id, converter=converter)
    sae, fd = load_sae(root / sae_id)  # layer from the path
    assert type(sae) is type(ref)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(fd.W_enc, torch.from_numpy(arrays["W_enc"]))
    for key in ("apply_b_dec_to_input", "normalize_activations", "d_in", "d_sae", "dtype"):
        assert getattr(sae.cfg, key) == getattr(ref.cfg, key), key
    for key in ("hook_name", "model_name"):
        assert sae.cfg.metadata[key] == ref.cfg.metadata[key], key
    assert (fd.layer, fd.hook_name, fd.architecture) == (3, "blocks.3.hook_resid_post", "jumprelu")
    assert not fd.apply_b_dec_to_input
    assert_same_as_saelens(ref, fd, inputs(2, 3, 5))


def test_gemma_scope_layer_argument_and_missing_layer(tmp_path):
    write_gemma_scope(tmp_path / "mine", seed=4)
    with pytest.raises(UserError, match="pass the layer"):
        load_sae(tmp_path / "mine")
    _, fd = load_sae(tmp_path / "mine", layer=7)
    assert (fd.layer, fd.hook_name) == (7, "blocks.7.hook_resid_post")


# ---------------------------------------------------------------- Llama Scope


def write_llama_scope(folder: Path, seed: int, avg_norm: float, threshold: float) -> dict:
    (folder / "checkpoints").mkdir(parents=True)
    w = weights(seed)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "decoder.weight": w["W_dec"].T.contiguous(),
               "encoder.bias": w["b_enc"], "decoder.bias": w["b_dec"]},
              folder / "checkpoints" / "final.safetensors")
    hp = {"d_model": D_IN, "d_sae": D_SAE, "hook_point_in": "blocks.5.hook_resid_post",
          "hook_point_out": "blocks.5.hook_resid_post", "jump_relu_threshold": threshold,
          "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm}}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return w


def test_llama_scope_folder_matches_saelens_loader(tmp_path, monkeypatch):
    release, sae_id = "llama_scope_lxr_8x", "l5r_8x"
    folder_name = "Llama3_1-8B-Base-L5R-8x"
    # SAELens folds the factor from its registry; pick the dataset norm that gives that factor
    factor = get_norm_scaling_factor(release, sae_id)
    assert factor is not None and abs(factor - 1) > 0.5
    w = write_llama_scope(tmp_path / folder_name, seed=21, avg_norm=D_IN**0.5 / factor,
                          threshold=0.013)

    def fake_download(repo_id, filename, subfolder=None, **_):
        assert repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x"
        return str(tmp_path / (f"{subfolder}/{filename}" if subfolder else filename))

    monkeypatch.setattr(sl_loaders, "hf_hub_download", fake_download)
    ref = SAE.from_pretrained(release, sae_id)  # SAELens's own llama_scope loader + folding
    sae, fd = load_sae(tmp_path / folder_name)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert sae.cfg.normalize_activations == ref.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.hook_name == ref.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    # the math SAELens applies: W_enc*s, W_dec/s, b_dec/s, b_enc as is, threshold = θ*s
    torch.testing.assert_close(fd.W_enc, w["W_enc"] * factor)
    torch.testing.assert_close(fd.W_dec, w["W_dec"] / factor)
    torch.testing.assert_close(fd.b_dec, w["b_dec"] / factor)
    torch.testing.assert_close(fd.b_enc, w["b_enc"])
    torch.testing.assert_close(fd.threshold, torch.full((D_SAE,), 0.013 * factor))
    assert (fd.layer, fd.architecture, fd.apply_b_dec_to_input) == (5, "jumprelu", False)
    assert_same_as_saelens(ref, fd, inputs(9, 4, 3) * 0.05)


# ---------------------------------------------------------------- sets and errors


def test_load_sae_set_from_template_and_table(tmp_path):
    for layer in (4, 2):
        save_sae(jumprelu(seed=layer, layer=layer), tmp_path / f"L{layer}")
    sset = load_sae_set(str(tmp_path / "L{layer}"), layers=[4, 2], quiet=True)
    assert isinstance(sset, SAESet) and sset.layers == [2, 4] and list(sset) == [2, 4]
    assert set(sset.saes) == {2, 4} and sset[4].hook_name == "blocks.4.hook_resid_post"
    table = load_sae_set({2: tmp_path / "L2", 4: {"path": tmp_path / "L4"}}, quiet=True)
    assert table.layers == [2, 4]
    sset.check_against(d_model=D_IN, n_layers=5)
    with pytest.raises(UserError, match="no SAE given for layer"):
        load_sae_set({2: tmp_path / "L2"}, layers=[2, 3], quiet=True)
    with pytest.raises(UserError, match=r"\{layer\}"):
        load_sae_set(str(tmp_path / "L2"), layers=[2, 4], quiet=True)
    with pytest.raises(UserError, match=r"\(layer 4\) but was given for layer 2: pass it for layer 4"):
        load_sae(tmp_path / "L4", layer=2)


def test_check_against_errors():
    sset = SAESet({12: FeatureDictionary.from_sae(jumprelu(layer=12))})
    with pytest.raises(UserError) as err:
        sset.check_against(d_model=D_IN + 8, n_layers=26)
    msg = str(err.value)
    assert msg == (f"SAE for layer 12 has d_in {D_IN} but model has d_model {D_IN + 8}: "
                   "pass SAEs trained on this model's residual stream")
    with pytest.raises(UserError, match=r"outside the model.*pass SAEs for layers 0-9") as err:
        sset.check_against(d_model=D_IN, n_layers=10)
    assert "\n" not in str(err.value)


def test_missing_and_unrecognised_folders(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*cfg\.json.*params\.npz.*hyperparams"):
        load_sae(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"junk has no recognised layout.*Gemma Scope"):
        load_sae(tmp_path / "junk")
    with pytest.raises(UserError, match="cannot load an SAE"):
        load_sae(42)


def test_registry_id_offline_says_to_pass_a_local_folder():
    # conftest sets HF_HUB_OFFLINE=1: SAELens's hub download fails without touching the network
    with pytest.raises(UserError, match="pass the local folder"):
        load_sae({"release": "gemma-scope-2b-pt-res-canonical",
                  "sae_id": "layer_3/width_16k/canonical"})
    with pytest.raises(UserError, match="unknown SAE"):
        load_sae({"release": "no-such-release", "sae_id": "x"})


def test_unsupported_architecture_is_a_user_error():
    sae = SAE.from_dict({"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE,
                         "metadata": {"hook_name": "blocks.1.hook_resid_post"}})
    with pytest.raises(UserError, match="not supported"):
        FeatureDictionary.from_sae(sae)
