"""Capture and sparsification against independent recomputation from the module weights, for every family."""

import json

import numpy as np
import pytest
import torch
from conftest import MOE_TEXT, tiny_tokenizer
from families import FAMILIES, reference_activations, tiny
from moe_families import build

from moeprof.arch import SUPPORTED, UnsupportedArchitecture, adapter_for, decoder_layers
from moeprof.capture import EXPERTS_IMPL, TraceRecorder, profile_capture, sparsify
from moeprof.stats import ProfileStats
from moeprof.store import open_store
from moeprof.topp import DEFAULT_P_GRID, rule_mask, topp_curve

TYPES = ("x", "u", "g", "i")


def ids_for(model, batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


def no_moeprof_left(model):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    engines = [m for m in model.modules() if "_moeprof_engine" in m.__dict__]
    return hooks == 0 and not engines and EXPERTS_IMPL not in ALL_EXPERTS_FUNCTIONS and \
        getattr(model.config, "_experts_implementation", None) != EXPERTS_IMPL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_leaves_logits_unchanged_and_model_restored(family):
    model = tiny(family)
    ids = ids_for(model)
    with torch.no_grad():
        ref = model(ids).logits
        stats = ProfileStats(2, adapter_for(model).sites(model)[0].num_experts, DEFAULT_P_GRID)
        with profile_capture(model, stats):
            got = model(ids).logits
    assert (got - ref).abs().max() <= 1e-5
    assert int(stats.activations["i"].vectors.sum()) > 0
    assert no_moeprof_left(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_sparsity_equals_recomputation_from_weights(family):
    model = tiny(family)
    ids = ids_for(model)
    sites = adapter_for(model).sites(model)
    E = max(s.num_experts for s in sites)
    stats = ProfileStats(len(sites), E, DEFAULT_P_GRID)
    with torch.no_grad(), profile_capture(model, stats):
        model(ids)
    _, ref = reference_activations(model, ids)
    for layer, (experts, acts) in ref.items():
        assert stats.routing.tokens[layer].tolist() == torch.bincount(experts, minlength=E).tolist()
        for t in TYPES:
            v = acts[t]
            sparsity = 1 - topp_curve(v, DEFAULT_P_GRID).double() / v.shape[-1]  # [N, P]
            want = torch.zeros(E, len(DEFAULT_P_GRID), dtype=torch.float64).index_add_(0, experts, sparsity)
            n = torch.bincount(experts, minlength=E).double()[:, None]
            got = stats.activations[t].mean_sparsity()[layer]
            seen = n[:, 0] > 0
            # fp32 GEMMs in another order may move one entry across a cut: allow one entry on a single vector.
            assert torch.allclose(got[seen], (want / n.clamp(min=1))[seen], atol=1.01 / v.shape[-1]), (layer, t)
            assert got[~seen].isnan().all()
            assert stats.activations[t].width[layer] == v.shape[-1]


def test_capture_sees_router_weights_and_experts_never_chosen():
    model = tiny("qwen3_moe")
    ids = ids_for(model, batch=1, seq=3)  # 3 tokens × 3 slots < 7 experts: some are never chosen
    stats = ProfileStats(2, 7, DEFAULT_P_GRID, ("i",))
    with torch.no_grad(), profile_capture(model, stats):
        model(ids)
    assert stats.routing.tokens.sum(-1).tolist() == [9, 9]
    assert (stats.routing.tokens == 0).any(dim=-1).all()
    # norm_topk_prob: each token's weights sum to one, so each layer's weight sum is the token count
    assert torch.allclose(stats.routing.weight_sum.sum(-1), torch.tensor([3.0, 3.0], dtype=torch.float64))


def reference_moe_sparse(experts, x, idx, w, type, p):
    """Dense-then-mask reference of a sparsified MoE layer, one (token, slot) at a time."""
    I = experts.down_proj.shape[-1]
    y = torch.zeros_like(x)
    kept = {}
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            xt = x[t]
            if type == "x":
                xt = xt * rule_mask(xt, "topp", p)
            gu = experts.gate_up_proj[e] @ xt
            up, g = gu[I:], experts.act_fn(gu[:I])
            if type == "u":
                up = up * rule_mask(up, "topp", p)
            if type == "g":
                g = g * rule_mask(g, "topp", p)
            i = g * up
            if type == "i":
                i = i * rule_mask(i, "topp", p)
            vec = {"x": xt, "u": up, "g": g, "i": i}[type]
            kept[(t, k)] = int((vec != 0).sum())
            y[t] += w[t, k] * (experts.down_proj[e] @ i)
    return y, kept


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_moe_sparsify_equals_dense_then_mask_reference(type, p, use_kernel):
    model = tiny("qwen3_moe")
    site = adapter_for(model).sites(model)[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, generator=g)
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)])
    w = torch.softmax(torch.randn(5, 3, generator=g), -1)
    with torch.no_grad():
        want, kept = reference_moe_sparse(site.experts, x, idx, w, type, p)
        with sparsify(model, type=type, p=p, use_kernel=use_kernel) as realized:
            got = site.experts(x, idx, w)
    assert torch.allclose(got, want, atol=1e-5)
    width = 48 if type == "x" else 24
    assert realized.tokens[0].sum() == 15 and realized.tokens[1].sum() == 0
    want_sparsity = sum(1 - n / width for n in kept.values()) / 15
    assert realized.token_weighted == pytest.approx(want_sparsity, abs=1e-6)  # the kernel reports fp32
    if p == 1.0:
        with torch.no_grad():
            assert torch.allclose(got, site.experts(x, idx, w), atol=1e-6)


@pytest.mark.parametrize("type", ["x", "i"])
@pytest.mark.parametrize("p", [0.3, 0.7, 1.0])
def test_moe_sparsify_of_one_token_equals_dense_then_mask_reference(type, p):
    # batch-1 decode: each of the token's K pairs has its own expert (the kernel's CPU path runs them in pair order)
    model = tiny("qwen3_moe")
    site = adapter_for(model).sites(model)[0]
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        x = torch.randn(1, 48, generator=g)
        idx = torch.randperm(7, generator=g)[:3].view(1, 3)
        w = torch.softmax(torch.randn(1, 3, generator=g), -1)
        with torch.no_grad():
            want, kept = reference_moe_sparse(site.experts, x, idx, w, type, p)
            with sparsify(model, type=type, p=p) as realized:
                got = site.experts(x, idx, w)
        assert torch.allclose(got, want, atol=1e-5)
        width = 48 if type == "x" else 24
        assert realized.token_weighted == pytest.approx(sum(1 - n / width for n in kept.values()) / 3, abs=1e-6)


@pytest.mark.parametrize("type", TYPES)
def test_dense_sparsify_equals_dense_then_mask_reference(type):
    model = tiny("llama")
    mlp = decoder_layers(model)[1].mlp
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        xt = x * rule_mask(x, "topp", 0.8) if type == "x" else x
        gate, up = mlp.gate_proj(xt), mlp.up_proj(xt)
        up = up * rule_mask(up, "topp", 0.8) if type == "u" else up
        g = mlp.act_fn(gate)
        g = g * rule_mask(g, "topp", 0.8) if type == "g" else g
        i = g * up
        i = i * rule_mask(i, "topp", 0.8) if type == "i" else i
        want = mlp.down_proj(i)
        with sparsify(model, type=type, p=0.8, layers=[1]) as realized:
            got = mlp(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert realized.tokens.tolist() == [[0], [10]]
    assert 0.0 < realized.token_weighted < 1.0
    assert no_moeprof_left(model)


def test_per_expert_p_table_leaves_nan_experts_dense():
    model = tiny("qwen3_moe")
    site = adapter_for(model).sites(model)[0]
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([[0, 1, 2]] * 6)
    w = torch.full((6, 3), 1 / 3)
    table = torch.full((2, 7), float("nan"))
    table[0, 1] = 0.5
    outs = []
    for use_kernel in (True, False):
        with torch.no_grad(), sparsify(model, type="i", p=table, use_kernel=use_kernel) as realized:
            outs.append(site.experts(x, idx, w))
        per = realized.per_expert()
        assert realized.tokens[0].tolist() == [0, 6, 0, 0, 0, 0, 0]
        assert per[0, 1] > 0.3 and per[0, [0, 2]].isnan().all()
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_flop_weighting_weights_layers_by_expert_size():
    from moeprof.capture import Realized

    r = Realized(torch.tensor([[10], [10]]), torch.tensor([[5.0], [9.0]], dtype=torch.float64),
                 torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert r.token_weighted == pytest.approx(14 / 20)
    assert r.flop_weighted == pytest.approx((5 * 1 + 9 * 3) / (10 * 1 + 10 * 3))


def test_sparsify_rejects_bad_arguments():
    model = tiny("llama")
    with pytest.raises(ValueError, match="unknown activation type"):
        with sparsify(model, type="q", p=0.5):
            pass
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        with sparsify(model, type="i", p=1.5):
            pass
    with pytest.raises(ValueError, match="do not exist"):
        with sparsify(model, type="i", p=0.5, layers=[5]):
            pass
    assert no_moeprof_left(model)


def test_context_restores_model_after_an_exception():
    model = tiny("qwen3_moe")
    stats = ProfileStats(2, 7, DEFAULT_P_GRID)
    with pytest.raises(KeyboardInterrupt):
        with profile_capture(model, stats):
            raise KeyboardInterrupt
    assert no_moeprof_left(model)
    assert model.config._experts_implementation == "grouped_mm"


def test_trace_records_routing_and_sparsity_for_first_tokens():
    model = tiny("qwen3_moe")
    ids = ids_for(model, batch=2, seq=4)
    stats = ProfileStats(2, 7, DEFAULT_P_GRID, ("x", "i"))
    trace = TraceRecorder(5, 2, 3, DEFAULT_P_GRID, ("x", "i"))
    with torch.no_grad(), profile_capture(model, stats, trace=trace):
        trace.begin_batch(ids, 0)
        model(ids)
        trace.end_batch(ids.numel())
    _, ref = reference_activations(model, ids)
    assert trace.recorded == 5
    assert trace.token_id.tolist() == ids.reshape(-1)[:5].tolist()
    assert trace.position.tolist() == [0, 1, 2, 3, 0] and trace.sequence.tolist() == [0, 0, 0, 0, 1]
    experts, acts = ref[1]
    assert trace.expert[:, 1].reshape(-1).tolist() == experts[:15].tolist()
    want = 1 - topp_curve(acts["i"][:15], DEFAULT_P_GRID).float() / 24
    assert torch.allclose(trace.sparsity["i"][:, 1].reshape(15, -1), want, atol=1.01 / 24)
    assert not trace.sparsity["x"].isnan().any()


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="supported model types: .*qwen3_moe"):
        adapter_for(GPT2Config())
    assert "llama" in SUPPORTED and "gemma3_text" in SUPPORTED


def test_qwen3_30b_a3b_recipe_builds_on_meta_with_48_by_128_expert_sites():
    from pathlib import Path

    from moeprof.cli.profiling import load_recipe
    from moeprof.models import build_on_meta, config_from_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "qwen3-30b-a3b.toml")
    model = build_on_meta(config_from_recipe(recipe))
    sites = adapter_for(model).sites(model)
    assert len(sites) == 48 and {s.kind for s in sites} == {"moe"}
    assert {(s.num_experts, s.top_k, s.hidden_size, s.intermediate_size) for s in sites} == {(128, 8, 2048, 768)}
    assert sum(s.num_experts for s in sites) == 48 * 128
    assert sites[0].experts.gate_up_proj.shape == (128, 2 * 768, 2048)
    assert 30.4e9 < sum(p.numel() for p in model.parameters()) < 30.6e9


def test_model_with_no_experts_implementation_set_is_restored_exactly():
    model = tiny("qwen3_moe")
    ids = ids_for(model)
    model.config._experts_implementation = None  # as a training script may leave it (eager forward)
    with torch.no_grad():
        ref = model(ids).logits
        with sparsify(model, type="i", p=0.5):
            model(ids)
        assert model.config._experts_implementation is None
        assert torch.allclose(model(ids).logits, ref, atol=1e-6)
    assert no_moeprof_left(model)


def test_sparsify_refuses_experts_and_p_that_would_do_nothing():
    from moeprof.capture import sparsify

    model = tiny("qwen3_moe", vocab_size=64)
    for kwargs, match in [({"experts": [99]}, "experts [99] do not exist; the model has experts 0..6"),
                          ({"experts": [-1]}, "experts [-1] do not exist"),
                          ({"p": float("nan")}, "p is NaN"),
                          ({"p": torch.ones(3)}, "must have shape [layers, experts] = [2, 7], got [3]"),
                          ({"p": torch.ones(2, 7, 1)}, "got [2, 7, 1]"),
                          ({"p": "abc"}, "p must be a number in [0, 1]"),
                          ({"p": torch.full((2, 7), 2.0)}, "p must lie in [0, 1]")]:
        with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
            with sparsify(model, type="i", **{"p": 0.5, **kwargs}):
                pass


def test_nonfinite_activation_is_located_or_skipped_and_counted(tmp_path):
    from moeprof.capture import NonFiniteActivation
    from moeprof.profile import profile as run_profile

    tok = tiny_tokenizer()
    model = tiny("qwen3_moe", vocab_size=len(tok))
    with torch.no_grad():  # expert 3 of layer 1 computes NaN for every token routed to it (its x stays finite)
        model.model.layers[1].mlp.experts.gate_up_proj[3].fill_(float("nan"))
    text = tmp_path / "t.txt"
    text.write_text(MOE_TEXT)
    kw = dict(model_id="tiny", max_tokens=64, seq_len=16, batch_size=2, show_progress=False, types=("x", "u", "i"))
    with pytest.raises(NonFiniteActivation, match=r"layer 1, expert 3, type u, token \d+ of the batch "
                                                  r"\(sequence [01] of the batch, position \d+\)"):
        run_profile(model, tok, [str(text)], tmp_path / "err.h5", **kw)
    assert not (tmp_path / "err.h5").exists()
    out = run_profile(model, tok, [str(text)], tmp_path / "skip.h5", on_nonfinite="skip", **kw).path
    with open_store(out) as st:
        routed = int(st.routing().tokens[1, 3])
        assert routed > 0
        assert json.loads(st.attrs["nonfinite_skipped"]) == {"x": 0, "u": routed, "i": routed}
        assert st.sparsity("u").vectors[1, 3] == 0 and st.sparsity("x").vectors[1, 3] == routed
        assert np.isfinite(st.sparsity("u").mean[0]).all()  # layer 0 untouched


def test_nonfinite_error_names_the_decoder_layer_and_site_kind():
    import torch

    from moeprof.arch import adapter_for
    from moeprof.capture import NonFiniteActivation, profile_capture
    from moeprof.stats import ProfileStats

    model = build("qwen2_moe")
    sites = adapter_for(model).sites(model)
    shared = [s for s in sites if s.kind == "shared"][0]
    assert (shared.layer, shared.row) == (1, 2)
    with torch.no_grad():
        shared.module.up_proj.weight[0, 0] = float("inf")
    stats = ProfileStats(len(sites), max(s.num_experts for s in sites), (0.5, 0.9), ("u",))
    with pytest.raises(NonFiniteActivation, match=r"at layer 1 \(shared\), expert 0, type u"):
        with profile_capture(model, stats, sites=sites), torch.no_grad():
            model(torch.arange(8).view(1, 8))
    # `moeprof stability` (no --on-nonfinite flag) meets the same error: the hint names the command that has it
    from moeprof.capture import Engine, attach
    from moeprof.stability import MaskRecorder

    with pytest.raises(NonFiniteActivation, match=r"\(`moeprof profile`: the one command that can\) pass "
                                                  r"--on-nonfinite skip"):
        with attach(model, Engine(sites, observers=[MaskRecorder("u", 0.9)])), torch.no_grad():
            model(torch.arange(8).view(1, 8))


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_refused_nested_sparsify_leaves_the_first_sparsification_as_it_was(family):
    import gc

    from moeprof.schedule import sparsify_, uniform

    model = tiny(family)
    ids = ids_for(model)
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, type="i", p=0.5) as realized:
            want = model(ids).logits
        handle = sparsify_(model, uniform(model, type="i", p=0.5))
        for nested in (lambda: sparsify_(model, uniform(model, type="i", p=0.7)),
                       lambda: sparsify(model, type="x", p=0.9).__enter__(),
                       lambda: profile_capture(model, ProfileStats(2, 7, DEFAULT_P_GRID)).__enter__()):
            with pytest.raises(RuntimeError, match="already inside a moeprof"):
                nested()
            gc.collect()
            assert torch.equal(model(ids).logits, want)
        assert realized.token_weighted > 0 and not torch.equal(want, dense)
        handle.remove()
        assert no_moeprof_left(model)
        assert torch.equal(model(ids).logits, dense)
