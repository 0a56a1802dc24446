"""Each site's Layout against the module's own forward and parameters, for every family; the activation table."""

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, tiny
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from moeprof.arch import (
    DENSE,
    ROUTED,
    SITE_KINDS,
    DenseMLPLayout,
    FusedExpertsLayout,
    adapter_for,
    experts_layout,
)
from moeprof.activation_functions import ACTIVATION_ALIASES, ACTIVATIONS, activation_fn, canonical_activation

# the activation each family's config names (a layout that takes another one must fail these tests)
FAMILY_ACTIVATION = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu",
                     "gemma3_text": "gelu_tanh", "qwen3_moe": "silu"}


def rows(n, h, seed=0):
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


def same_storage(view, param):
    return view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


def test_every_family_has_its_expected_activation():
    assert set(FAMILY_ACTIVATION) == set(FAMILIES)


# ------------------------------------------------------------------------------------------------------------
# The one activation table


def test_activation_table_has_one_function_per_canonical_name_and_every_alias_resolves():
    assert set(ACTIVATION_ALIASES.values()) == set(ACTIVATIONS)  # no canonical name without a spelling, and back
    for name in ACTIVATIONS:
        assert canonical_activation(name) == name  # canonical names are spellings of themselves
    v = rows(64, 9) * 4
    for alias, name in ACTIVATION_ALIASES.items():
        assert activation_fn(alias) is ACTIVATIONS[name]
        # a config spelling means in moeprof what it means in transformers (moeprof's own names are not spellings)
        reference = ACT2FN[alias] if alias in ACT2FN else {"gelu_tanh": ACT2FN["gelu_pytorch_tanh"]}[alias]
        assert torch.allclose(activation_fn(alias)(v), reference(v), atol=1e-6), alias


def test_unknown_activation_names_the_known_spellings():
    with pytest.raises(ValueError, match="gelu_pytorch_tanh"):
        canonical_activation("relu")


def test_kernel_activations_come_from_the_one_table():
    from moeprof.kernels import ACT_ALIASES
    from moeprof.kernels.reference import KERNEL_ACTIVATIONS, glu_act

    assert ACT_ALIASES == {a: n for a, n in ACTIVATION_ALIASES.items() if n in KERNEL_ACTIVATIONS}
    assert set(KERNEL_ACTIVATIONS) <= set(ACTIVATIONS)
    v = rows(8, 5) * 3
    for name in KERNEL_ACTIVATIONS:
        assert torch.equal(glu_act(v, name), ACTIVATIONS[name](v))


def test_silu_and_gelu_tanh_differ_enough_for_the_family_tests_to_tell_them_apart():
    v = rows(32, 24) * 4
    assert (ACTIVATIONS["silu"](v) - ACTIVATIONS["gelu_tanh"](v)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------------------
# Sites of every family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sites_carry_kind_layout_and_sizes(family):
    model = tiny(family)
    for site in adapter_for(model).sites(model):
        assert site.kind in SITE_KINDS
        assert site.mlp is site.module
        assert site.activation == site.layout.activation == FAMILY_ACTIVATION[family]
        assert site.flops_per_token == 3 * site.hidden_size * site.intermediate_size
        if site.is_routed:
            assert site.kind == ROUTED and isinstance(site.layout, FusedExpertsLayout)
            assert site.layout.module is site.experts
            assert site.num_experts == site.experts.gate_up_proj.shape[0] > 1
        else:
            assert site.kind == DENSE and isinstance(site.layout, DenseMLPLayout) and site.experts is None
            assert (site.num_experts, site.top_k) == (1, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_glu_equals_the_modules_own_forward(family):
    model = tiny(family)
    for site in adapter_for(model).sites(model):
        x = rows(11, site.hidden_size, seed=site.layer)
        with torch.no_grad():
            for e in range(site.num_experts):
                u, g, i = site.layout.glu(x, e)
                assert u.shape == g.shape == i.shape == (11, site.intermediate_size)
                y = site.layout.down(i, e)
                assert torch.allclose(site.layout.forward(x, e), y)
                if site.is_routed:  # the stock experts forward with every token routed to e alone, weight 1
                    own = site.experts(x, torch.full((11, 1), e), torch.ones(11, 1))
                else:
                    own = site.mlp(x)
                assert torch.allclose(y, own, atol=1e-5, rtol=1e-5), (site.layer, e)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_u_is_the_up_projection_and_g_the_activated_gate(family):
    # u and g separately: a layout that swaps gate and up, or applies another activation, gives the same
    # shapes but other values (for a GLU, y alone would not catch a swap of the roles of u and g's inputs).
    model = tiny(family)
    name = FAMILY_ACTIVATION[family]
    act = ACT2FN[{"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[name]]
    other = ACT2FN[{"silu": "gelu_pytorch_tanh", "gelu_tanh": "silu"}[name]]
    for site in adapter_for(model).sites(model):
        x = rows(7, site.hidden_size, seed=10 + site.layer)
        with torch.no_grad():
            for e in range(site.num_experts):
                if site.is_routed:
                    I = site.intermediate_size
                    fused = site.experts.gate_up_proj[e]  # [2I, H], gate rows first (Qwen3-MoE)
                    gate_pre, up_pre = x @ fused[:I].T, x @ fused[I:].T
                else:
                    gate_pre, up_pre = site.mlp.gate_proj(x), site.mlp.up_proj(x)
                u, g, i = site.layout.glu(x, e)
                assert torch.allclose(u, up_pre, atol=1e-5)
                assert torch.allclose(g, act(gate_pre), atol=1e-5)
                assert not torch.allclose(g, other(gate_pre), atol=1e-3)
                assert torch.allclose(i, u * g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_weights_are_views_of_the_modules_parameters(family):
    model = tiny(family)
    for site in adapter_for(model).sites(model):
        for e in range(site.num_experts):
            w = site.layout.weights(e)
            if site.is_routed:
                I = site.intermediate_size
                gate_up, down = site.experts.gate_up_proj, site.experts.down_proj
                want = (gate_up[e, :I], gate_up[e, I:], down[e])
                params = (gate_up, gate_up, down)
            else:
                m = site.mlp
                want = params = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
            for got, ref, param in zip(w, want, params):
                assert torch.equal(got, ref) and same_storage(got, param)
            assert site.layout.biases(e) is None
        with pytest.raises(IndexError, match="does not exist"):
            site.layout.weights(site.num_experts)


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma3_text"])
def test_kernel_ok_only_for_fused_experts_in_the_kernels_layout(family):
    model = tiny(family)
    for site in adapter_for(model).sites(model):
        assert site.layout.kernel_ok == site.is_routed
        if site.is_routed:
            gate_up, down = site.layout.kernel_weights()
            assert gate_up is site.experts.gate_up_proj and down is site.experts.down_proj
        else:
            with pytest.raises(ValueError, match="kernel_ok"):
                site.layout.kernel_weights()


def test_dense_taps_name_where_the_modules_forward_carries_each_type():
    model = tiny("llama")
    site = adapter_for(model).sites(model)[0]
    m = site.mlp
    assert site.layout.taps() == {"x": (m, "input"), "u": (m.up_proj, "output"), "g": (m.act_fn, "output"),
                                  "i": (m.down_proj, "input")}


# ------------------------------------------------------------------------------------------------------------
# Fused experts storage flags, read from the decorator (a synthetic experts class, no new family)


def synthetic_experts(concatenated: bool, transposed: bool, bias: bool, E=5, H=12, I=8, own_gate=None):
    """Return a decorated experts module with random weights in the given storage (run by transformers' batched_mm)."""

    @use_experts_implementation(is_concatenated=concatenated, is_transposed=transposed, has_bias=bias)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.num_experts = E
            self.gate_up_proj = nn.Parameter(torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=g))
            self.down_proj = nn.Parameter(torch.randn((E, I, H) if transposed else (E, H, I), generator=g) / 4)
            if bias:
                self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * I, generator=g))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
            self.act_fn = ACT2FN["silu"]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the stock implementation runs, not this one")

    if not concatenated:  # transformers' implementations leave de-interleaving to the class's _apply_gate
        def _apply_gate(self, gate_up):
            return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]
        Experts._apply_gate = _apply_gate
    config = type("Config", (), {"_experts_implementation": "batched_mm"})()
    return Experts(config)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("concatenated", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layout_reads_storage_flags_like_transformers(concatenated, transposed, bias):
    experts = synthetic_experts(concatenated, transposed, bias)
    layout = FusedExpertsLayout(experts, "silu")
    assert (layout.num_experts, layout.hidden_size, layout.intermediate_size) == (5, 12, 8)
    x = rows(6, 12, seed=3)
    counts = [2, 0, 3, 0, 1]
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    with torch.no_grad():
        want = experts(x, ids[:, None], torch.ones(6, 1))  # stock batched_mm, one expert per row
        gate_pre, up_pre = layout.project_grouped(x, counts)
        got = layout.down_grouped(layout.combine(layout.up(up_pre), layout.gate(gate_pre)), counts)
        assert torch.allclose(got, want, atol=1e-4)
        for e in (0, 2, 4):
            w, b = layout.weights(e), layout.biases(e)
            assert (b is not None) == bias
            gate = x @ w.gate.T + (b.gate if bias else 0)
            up = x @ w.up.T + (b.up if bias else 0)
            y = (F.silu(gate) * up) @ w.down.T + (b.down if bias else 0)
            assert torch.allclose(y, experts(x, torch.full((6, 1), e), torch.ones(6, 1)), atol=1e-4)
    assert layout.kernel_ok == (concatenated and not transposed and not bias)


def test_experts_whose_own_gate_differs_from_every_layout_are_refused():
    # The case: a clamp that only large values reach (DeepSeek-V4 clamps at 10); σ(gate) ⊙ up would be
    # silently wrong there, so the class is refused.
    experts = synthetic_experts(True, False, False)
    type(experts)._apply_gate = lambda self, gu: F.silu(gu.chunk(2, -1)[0].clamp(max=10)) * gu.chunk(2, -1)[1]
    with pytest.raises(ValueError, match="_apply_gate differs"):
        experts_layout(experts, "silu")
    # An interleaved class decodes gate/up in its own _apply_gate, exactly what the layout computes: accepted.
    assert isinstance(experts_layout(synthetic_experts(False, False, False), "silu"), FusedExpertsLayout)
    assert isinstance(experts_layout(synthetic_experts(True, True, True), "silu"), FusedExpertsLayout)


def test_the_activation_table_and_the_kernels_stay_leaves():
    import subprocess
    import sys

    code = ("import sys, moeprof.activation_functions, moeprof.kernels; "
            "bad = [m for m in ('transformers', 'moeprof.arch', 'h5py') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
