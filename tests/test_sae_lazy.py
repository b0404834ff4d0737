"""SAEs loaded a layer at a time (io/sae_lazy.py): memory-mapped Gemma Scope arrays equal to what
SAELens loads, nothing read before a layer is asked for, layers dropped on release, and JumpReLU
thresholds compared in their stored precision."""

import numpy as np
import pytest
import torch
from sae_fixtures import sae_set

from refusalscope.errors import UserError
from refusalscope.io.sae_lazy import LazySAESet, gemma_scope_dictionary, lazy_sae_set, npz_array
from refusalscope.io.sae_loading import load_sae
from refusalscope.io.saes import FeatureDictionary, make_jumprelu_sae, save_sae


def _gemma_folder(root, layer, d=16, m=48, seed=0, compressed=False):
    g = torch.Generator().manual_seed(seed + layer)
    arrays = {"W_enc": torch.randn(d, m, generator=g), "W_dec": torch.randn(m, d, generator=g),
              "b_enc": torch.randn(m, generator=g), "b_dec": torch.randn(d, generator=g),
              "threshold": torch.rand(m, generator=g)}
    folder = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    save = np.savez_compressed if compressed else np.savez
    save(folder / "params.npz", **{k: v.numpy() for k, v in arrays.items()})
    return folder, arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_gemma_scope_memory_map_equals_saelens_loader(tmp_path, compressed):
    folder, arrays = _gemma_folder(tmp_path, 5, compressed=compressed)
    assert isinstance(npz_array(folder / "params.npz", "W_enc"), np.memmap) is not compressed
    fd = gemma_scope_dictionary(folder, 5)
    ref = load_sae(str(folder), layer=5).features
    assert (fd.layer, fd.hook_name, fd.architecture) == (ref.layer, ref.hook_name, "jumprelu")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(fd, name), arrays[name]), name
        assert torch.equal(getattr(fd, name), getattr(ref, name)), name
    h = torch.randn(3, 16)
    assert torch.equal(fd.encode(h), ref.encode(h))


def test_lazy_set_reads_a_layer_on_first_access_and_drops_it_on_release(tmp_path):
    template = None
    for layer in (2, 3, 4):
        folder, _ = _gemma_folder(tmp_path, layer)
        template = str(folder).replace(f"layer_{layer}", "layer_{layer}")
    saes = lazy_sae_set({l: template.replace("{layer}", str(l)) for l in (2, 3, 4)})
    assert (list(saes), saes.loaded, 3 in saes, 7 in saes) == ([2, 3, 4], [], True, False)
    assert saes.d_sae(4) == 48 and saes.loaded == []  # widths come from the headers
    saes.check_against(16, 6)
    assert saes.loaded == []
    with pytest.raises(UserError, match="d_in 16 but model has d_model 32"):
        saes.check_against(32, 6)
    assert saes[3].d_sae == 48 and saes.loaded == [3]
    assert saes[3] is saes[3]  # read once
    saes.release(keep=[3])
    assert saes.loaded == [3]
    saes.release()
    assert saes.loaded == []
    moved = saes.to(dtype=torch.bfloat16)
    assert moved[2].W_enc.dtype == torch.bfloat16 and moved[2].threshold.dtype == torch.float32
    with pytest.raises(KeyError):
        saes[7]


def test_lazy_set_loads_saelens_folders_one_layer_at_a_time(tmp_path):
    eager = sae_set("jumprelu", [1, 2], d=16, m=32)
    for l in (1, 2):
        save_sae(eager.saes[l], tmp_path / f"l{l}")
    saes = lazy_sae_set({l: str(tmp_path / f"l{l}") for l in (1, 2)})
    assert saes.loaded == []
    assert torch.equal(saes[2].W_enc, eager[2].W_enc) and saes.loaded == [2]


def _at_threshold_sae(dtype):
    """One latent whose pre-activation is exactly 1.0 and whose threshold, 1 - 2^-10, rounds to
    1.0 in bfloat16: active in the stored precision, inactive after a cast of the threshold."""
    thr = 1.0 - 2.0 ** -10
    sae = make_jumprelu_sae(torch.eye(4)[:, :2], torch.eye(4)[:2], torch.zeros(2), torch.zeros(4),
                            torch.tensor([thr, 5.0]), hook_name="blocks.0.hook_resid_post")
    return FeatureDictionary.from_sae(sae, 0).to(dtype=dtype)


def test_jumprelu_threshold_is_compared_in_stored_precision():
    assert torch.tensor(1.0 - 2.0 ** -10).bfloat16().item() == 1.0  # the case the test is about
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    fp32, bf16 = _at_threshold_sae(torch.float32), _at_threshold_sae(torch.bfloat16)
    assert bf16.threshold.dtype == torch.float32
    for fd in (fp32, bf16):
        assert fd.encode(h)[0].tolist() == [1.0, 0.0]
        assert fd.encode_subset(h, [0])[0].tolist() == [1.0]
    rounded = bf16.threshold.bfloat16()  # what a cast threshold would say: inactive
    assert not bool(fp32.pre_activations(h)[0, 0].bfloat16() > rounded[0])


def test_lazy_set_rejects_a_layer_filed_under_another():
    fd = _at_threshold_sae(torch.float32)
    with pytest.raises(UserError, match="filed under layer 3"):
        LazySAESet({3: lambda: fd})[3]


def _counted_lazy_set(root, layers, d, m):
    """A real LazySAESet over Gemma Scope folders whose loads are counted per layer."""
    loads: dict[int, int] = {}

    def loader(folder, layer):
        def load():
            loads[layer] = loads.get(layer, 0) + 1
            return gemma_scope_dictionary(folder, layer)
        return load

    folders = {l: _gemma_folder(root, l, d=d, m=m)[0] for l in layers}
    return LazySAESet({l: loader(f, l) for l, f in folders.items()}, {l: d for l in layers},
                      {l: m for l in layers}), loads


def test_widths_come_from_headers_and_the_random_control_loads_only_the_layers_it_draws(tmp_path):
    from tiny import tiny_llama

    from refusalscope.interventions.features import Feature, FeatureSet
    from refusalscope.io.model import ChatModel
    from refusalscope.io.prompts import Prompt
    from refusalscope.io.saes import sae_width
    from refusalscope.methods import taxonomy

    saes, loads = _counted_lazy_set(tmp_path, range(4), d=64, m=48)
    assert sae_width(saes, 2) == 48 and sae_width({2: saes[2]}, 2) == 48  # lazy set and plain dict
    loads.clear()
    saes.release()
    assert len(taxonomy.layer_features(saes, [1, 3])) == 96
    assert FeatureSet(["0-47", "3-0"]).checked(saes) and loads == {}
    with pytest.raises(UserError, match=r"outside the layer-2 SAE \(48 latents\)"):
        FeatureSet(["2-48"]).checked(saes)
    pool = taxonomy.LatentPool(saes, exclude=[Feature(1, 5)])
    assert len(pool) == 4 * 48 - 1 and loads == {}
    import random

    drawn = random.Random(3).sample(pool, 3)  # the controls analysis: a few random latents
    model = ChatModel(*tiny_llama(layers=4, d=64), name="llama")
    prompts = [Prompt(f"how do I do thing {i}", category=c) for i, c in enumerate(["a", "b", "a"])]
    counts = taxonomy.category_activity(model, saes, prompts, drawn, batch_size=4)
    drawn_layers = {Feature.of(f).layer for f in drawn}
    assert set(counts) == set(drawn) and set(loads) == drawn_layers and set(loads.values()) == {1}
    assert drawn_layers != set(range(4))  # the check above could fail: some layer was never needed


def test_model_summary_of_a_lazy_set_holds_no_extra_layer_and_equals_the_loaded_one(tmp_path):
    from tiny import tiny_llama

    from refusalscope.io.model import ChatModel
    from refusalscope.io.saes import SAESet
    from refusalscope.methods.model_summary import model_summary

    model = ChatModel(*tiny_llama(layers=4, d=64), name="llama")
    texts = ["the sea is wide and deep", "bread needs flour, water and time", "a poem about rain"]
    saes, loads = _counted_lazy_set(tmp_path, range(4), d=64, m=48)
    plain = SAESet({l: saes[l] for l in range(4)})  # the same dictionaries, all held
    saes.release(keep=[1])  # a caller holds layer 1
    loads.clear()
    got = model_summary(model, saes, texts, batch_size=2)
    assert saes.loaded == [1] and loads == {0: 2, 2: 2, 3: 2}  # one read per batch, then dropped
    assert got == model_summary(model, plain, texts, batch_size=2)
    assert [s["d_sae"] for s in got["saes"]] == [48] * 4 and all(s["l0"] is not None for s in got["saes"])
