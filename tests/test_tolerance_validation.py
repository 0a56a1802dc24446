"""Per-expert tolerance, validated on the embedded tiny MoE: experts estimated tolerant really hurt less."""

from moeprof.critical import tolerance_split_damage
from moeprof.models import load_model


def test_sparsifying_the_estimated_tolerant_half_costs_less_than_the_sensitive_half():
    model, tok = load_model("tiny-moe")
    (row,) = tolerance_split_damage(model, tok, tokens=4096, ps=[0.5])
    tolerant, sensitive = row["tolerant"], row["sensitive"]
    # comparable work removed (same p, similar realized sparsity and routed vectors) ...
    assert abs(tolerant["sparsity"] - sensitive["sparsity"]) < 0.05
    assert 0.8 < tolerant["vectors"] / sensitive["vectors"] < 1.25
    # ... but clearly less damage where the estimate said so
    assert 0 < tolerant["delta_nll"] < 0.7 * sensitive["delta_nll"]
