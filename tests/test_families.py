"""Coverage: every MoE family of the installed transformers, on a tiny random config, through moeprof's capture.

For each family in `moe_families.COVERED`: the model's output is unchanged while captured (fp32, ≤ 1e-5); every
routed (token, expert) pair is counted once; per-expert sparsity of x and i equals an independent recomputation
from the experts module's own weights and its own `_apply_gate` (or act_fn for non-gated experts), fed by the
routing the stock implementation saw. Families listed in `moe_families.UNSUPPORTED` are refused or skipped with
the reason the table of docs/families.md prints.
"""

import pytest
import torch

from pathlib import Path

from moe_families import (COVERED, UNSUPPORTED, build, coverage_table, family_row, forward_inputs, moe_families,
                          output_of)
from moeprof.arch import adapter_for
from moeprof.arch.experts import is_experts, router_facts
from moeprof.capture import profile_capture
from moeprof.stats import ProfileStats
from moeprof.topp import DEFAULT_P_GRID, topp_curve

P_GRID = DEFAULT_P_GRID
ROWS: dict[str, str] = {}  # family → its docs/families.md row, filled by the coverage test (built once)


def _ids(model, seq=8):
    torch.manual_seed(1)
    return torch.randint(1, 90, (1, seq))


def _stock_calls(model, ids):
    """Run the stock forward; return per experts module the (hidden, top_k_index, top_k_weights) it was given."""
    calls, hooks = {}, []
    for m in model.modules():
        if is_experts(m):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs: calls.setdefault(id(mod), []).append(_args(args, kwargs)),
                with_kwargs=True))
    try:
        with torch.no_grad():
            out = output_of(model(**forward_inputs(model, ids)))
    finally:
        for h in hooks:
            h.remove()
    return out, calls


def _args(args, kwargs):
    hidden, idx, weights = (list(args) + list(kwargs.values()))[:3]
    return hidden.detach().reshape(-1, hidden.shape[-1]).clone(), idx.detach().clone(), weights.detach().clone()


def _reference_intermediate(experts, x, e):
    """Return (u-free) i of rows x through expert e from the module's own weights and its own gate."""
    m = experts
    if m.has_gate:
        w = m.gate_up_proj[e]
        proj = x @ w if m.is_transposed else x @ w.T
        if m.has_bias:
            proj = proj + m.gate_up_proj_bias[e]
        return type(m)._apply_gate(m, proj)
    w = m.up_proj[e]
    proj = x @ w if m.is_transposed else x @ w.T
    if m.has_bias:
        proj = proj + m.up_proj_bias[e]
    return m.act_fn(proj)


def _mean_sparsity(v):
    return (1 - topp_curve(v, P_GRID).double() / v.shape[-1]).mean(0)  # [P]


def test_every_decorated_family_is_covered_or_listed_with_a_reason():
    assert sorted(set(COVERED) | set(UNSUPPORTED)) == moe_families()
    assert not set(COVERED) & set(UNSUPPORTED)
    assert len(COVERED) >= 60


@pytest.mark.parametrize("family", COVERED)
def test_family_capture_is_exact(family):
    model = build(family)
    ROWS[family] = family_row(family, model)
    _check_exact(model)


@pytest.mark.parametrize("family, limit, extra", [
    ("gpt_oss", "limit", {}), ("deepseek_v4", "limit", {}), ("glm5_next", "swiglu_limit", {}),
    ("step3p7", "limit", {"swiglu_limits": [7.0, 7.0]}),  # per-layer limits; none (the default) means no clamp
])
def test_clamped_glus_are_exact_where_the_clamps_bite(family, limit, extra):
    model = build(family, scale=40.0, **extra)  # weights large enough that gate and up projections pass the clamp
    calls = _check_exact(model)
    reached = False
    for m in model.modules():
        if is_experts(m) and id(m) in calls:
            (hidden, idx, _), = calls[id(m)]
            e = int(idx[0, 0])
            w = m.gate_up_proj[e]
            proj = hidden @ w if m.is_transposed else hidden @ w.T
            reached |= bool((proj.abs() > getattr(m, limit)).any())
    assert reached, "no projection reached the clamp: the test would not see a wrong GLU"


def _check_exact(model):
    """Assert the family's capture is exact (output, routed pairs, per-expert sparsity); return the stock calls."""
    ids = _ids(model)
    ref, calls = _stock_calls(model, ids)
    sites = adapter_for(model).sites(model)
    routed = [s for s in sites if s.is_routed]
    assert routed, "no routed experts found"
    E = max(s.num_experts for s in sites)
    stats = ProfileStats(len(sites), E, P_GRID, ("x", "i"))
    with torch.no_grad(), profile_capture(model, stats, sites=sites):
        got = output_of(model(**forward_inputs(model, ids)))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), float((got - ref).abs().max())
    with torch.no_grad():
        assert torch.equal(output_of(model(**forward_inputs(model, ids))), ref)  # restored: the stock implementation again

    # router facts against the router's own code path: renormalized ⇔ each token's top-k weights, as the stock
    # forward handed them to the experts, sum to one constant (1, or a fixed routed scaling)
    facts = router_facts(model, sites)
    (_, _, weights0), = calls[id(routed[0].experts)]
    sums = weights0.float().sum(-1)
    if facts["renormalized"] is not None:
        assert facts["renormalized"] == bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-4, atol=1e-5)), (
            facts, sums[:4])
    for s in routed:
        (hidden, idx, weights), = calls[id(s.experts)]
        flat = idx.reshape(-1)
        local = flat < s.num_experts
        tok = torch.arange(idx.numel()) // idx.shape[-1]
        n = torch.bincount(flat[local], minlength=E)
        assert stats.routing.tokens[s.row].tolist() == n.tolist(), "each routed (token, expert) pair once"
        want_i = torch.full((E, len(P_GRID)), float("nan"), dtype=torch.float64)
        want_x = want_i.clone()
        with torch.no_grad():
            for e in range(s.num_experts):
                x = hidden[tok[local & (flat == e)]]
                if len(x):
                    want_i[e] = _mean_sparsity(_reference_intermediate(s.experts, x, e).float())
                    want_x[e] = _mean_sparsity(x)
        seen = n > 0
        for t, want in (("i", want_i), ("x", want_x)):
            got_t = stats.activations[t].mean_sparsity()[s.row]
            width = stats.activations[t].width[s.row]
            # fp32 GEMMs in another order may move one entry across a cut on a single vector
            assert torch.allclose(got_t[seen], want[seen], atol=1.01 / float(width)), (t, s.row)
            assert got_t[~seen].isnan().all()
    for s in sites:
        if not s.is_routed:  # shared experts and dense MLPs see every token once
            assert stats.routing.tokens[s.row, 0] == ids.numel() and stats.routing.tokens[s.row, 1:].sum() == 0
    return calls


def test_mixtral_router_facts_say_it_renormalizes_measured_from_its_router():
    model = build("mixtral")
    facts = router_facts(model, adapter_for(model).sites(model))
    assert not hasattr(model.config, "norm_topk_prob")  # the config does not say; MixtralTopKRouter divides by the sum
    assert facts["renormalized"] is True and facts["renormalized_from"] == "probe"
    from moeprof.arch.experts import probe_renormalized

    sites = adapter_for(model).sites(model)
    stats = ProfileStats(len(sites), sites[0].num_experts, P_GRID, ("i",))
    with profile_capture(model, stats, sites=sites):  # a checkpoint written mid-capture: no probe through it
        assert probe_renormalized(sites[0]) is None
    assert int(stats.routing.tokens.sum()) == 0
    olmoe = build("olmoe", norm_topk_prob=False)
    assert router_facts(olmoe, adapter_for(olmoe).sites(olmoe))["renormalized"] is False


def test_every_family_is_covered_or_has_a_reason():
    # No family of transformers 5.25 is refused today (test_sites checks the refusal of a GLU that no Layout
    # matches on a synthetic class); each one not covered is named with why.
    assert set(COVERED) | set(UNSUPPORTED) == set(moe_families()) and not set(COVERED) & set(UNSUPPORTED)
    assert all(r.why for r in UNSUPPORTED.values())


def test_family_table_in_docs_is_the_one_the_coverage_test_checks():
    rows = {f: ROWS.get(f) or family_row(f, build(f)) for f in COVERED}
    page = (Path(__file__).parents[1] / "docs" / "families.md").read_text()
    assert coverage_table(rows) in page, "regenerate it: python tests/moe_families.py (into docs/families.md)"


def test_an_architecture_with_no_experts_and_no_dense_glu_names_the_nearest_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    from moeprof.arch import UnsupportedArchitecture

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' .*no experts interface.*nearest supported family"):
        adapter_for(model)


def test_expert_parallel_sentinel_ids_are_dropped_and_counted_nowhere():
    model = build("mixtral")
    site = next(s for s in adapter_for(model).sites(model) if s.is_routed)
    E = site.num_experts
    torch.manual_seed(0)
    hidden = torch.randn(6, site.hidden_size)
    idx = torch.tensor([[0, E], [1, 2], [E, 3], [2, 0], [3, E + 1], [1, 0]])  # ids ≥ E: another rank's experts
    weights = torch.rand(6, 2)
    sentinel = idx >= E
    with torch.no_grad():
        want = site.experts(hidden, idx.clamp(max=E - 1), weights.masked_fill(sentinel, 0.0))  # stock
        stats = ProfileStats(len(adapter_for(model).sites(model)), E, P_GRID, ("i",))
        with profile_capture(model, stats):
            got = site.experts(hidden, idx, weights)
    assert torch.allclose(got, want, atol=1e-5)
    assert stats.routing.tokens[site.row].tolist() == torch.bincount(idx[~sentinel], minlength=E).tolist()
    assert int(stats.activations["i"].vectors[site.row].sum()) == int((~sentinel).sum())


def test_sparsifying_g_of_non_gated_experts_is_refused():
    from moeprof.capture import sparsify

    model = build("nemotron_h")
    assert any(s.is_routed and "g" not in s.layout.types for s in adapter_for(model).sites(model))
    with pytest.raises(ValueError, match="non-gated"):
        with sparsify(model, type="g", p=0.5):
            pass


def test_expert_parallel_local_ids_map_to_global_experts_by_the_rank_offset(monkeypatch):
    """A fake 2-rank split of Mixtral's 4 experts, seen from rank 1: the module holds experts 2 and 3 as local
    0 and 1 (`num_experts` = 2, `_is_expert_parallel`, as transformers' MoEParamShard leaves it), gets local ids
    with other ranks' pairs marked 2; the profile's rows are the global experts 2 and 3."""
    from torch import nn

    import moeprof.capture as capture

    model = build("mixtral")
    sites = adapter_for(model).sites(model)  # built on the whole (global) module, as on the DTensor weights
    site = next(s for s in sites if s.is_routed)
    ex, E = site.experts, site.num_experts
    full_gate_up, full_down = ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()
    ex.gate_up_proj, ex.down_proj = nn.Parameter(full_gate_up[2:]), nn.Parameter(full_down[2:])
    ex.num_experts, ex._is_expert_parallel = 2, True
    monkeypatch.setattr(capture, "expert_parallel_rank", lambda experts: 1)
    torch.manual_seed(0)
    hidden = torch.randn(6, site.hidden_size)
    global_idx = torch.tensor([[0, 2], [1, 3], [2, 3], [3, 0], [1, 0], [2, 1]])
    on_rank = global_idx >= 2
    local_idx = torch.where(on_rank, global_idx - 2, torch.full_like(global_idx, 2))  # 2: another rank's expert
    weights = torch.rand(6, 2).masked_fill(~on_rank, 0.0)
    with torch.no_grad():
        want = ex(hidden, local_idx, weights)  # transformers' own expert-parallel path (sentinel rows skipped)
        stats = ProfileStats(len(sites), E, P_GRID, ("i",))
        with profile_capture(model, stats, sites=sites):
            got = ex(hidden, local_idx, weights)
    assert torch.allclose(got, want, atol=1e-5)
    assert stats.routing.tokens[site.row].tolist() == torch.bincount(global_idx[on_rank], minlength=E).tolist()
    for e in (2, 3):  # each global expert's sparsity from its own (global) weights
        x = hidden[on_rank.nonzero()[:, 0][global_idx[on_rank] == e]]
        gate, up = (x @ full_gate_up[e].T).chunk(2, dim=-1)
        want_i = _mean_sparsity((ex.act_fn(gate) * up).float())
        got_i = stats.activations["i"].mean_sparsity()[site.row, e]
        assert torch.allclose(got_i, want_i, atol=1.01 / up.shape[-1])
    assert stats.activations["i"].vectors[site.row, :2].sum() == 0


def test_a_family_whose_glu_changes_in_a_new_release_is_refused_not_profiled_approximately():
    """What a transformers release that changes a family's GLU looks like to moeprof: the experts class's own
    `_apply_gate` no longer computes what the family's Layout computes (here Step-3.7's clamp moved back before
    the activation). Profiling must stop with the clear refusal, before any statistic is taken."""
    from moeprof.arch import UnsupportedArchitecture

    model = build("step3p7", swiglu_limits=[7.0, 7.0])
    experts = [m for m in model.modules() if is_experts(m)]
    assert experts
    stock = type(experts[0])

    class ChangedInANewRelease(stock):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)

    for m in experts:  # these instances only: the class itself (and every other model) is untouched
        m.__class__ = ChangedInANewRelease
    with pytest.raises(UnsupportedArchitecture, match="refuses to profile it approximately"):
        adapter_for(model).sites(model)
    assert all(type(m) is stock for m in build("step3p7").modules() if is_experts(m))
