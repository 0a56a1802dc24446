"""Per-expert tolerance, validated where the answer is known: on the embedded tiny MoE, half of each layer's experts
are rebuilt so that top-p drops much of their output (a few intermediate entries boosted 8x, their down_proj
columns divided by 8: the dense output is unchanged, but those entries now take most of the L1 mass). The estimate
must name those experts sensitive, and sparsifying the half it calls tolerant must cost clearly less NLL.

(On the unmodified v2 model the two halves differ little: `python benchmarks/critical/validate_tolerance.py` gives
ΔNLL 0.079 vs 0.085 at p = 0.5; see docs/results.md.)"""

import torch

from moeprof.critical import tolerance_split_damage
from moeprof.critical.tolerance import expert_tolerance_of_model
from moeprof.models import load_model


def _rebuilt_model():
    model, tok = load_model("tiny-moe")
    gen = torch.Generator().manual_seed(0)
    made = []
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            E, two_i, _ = experts.gate_up_proj.shape
            inter = two_i // 2
            chosen = torch.randperm(E, generator=gen)[: E // 2]
            made.append(set(chosen.tolist()))
            for e in chosen.tolist():
                dims = torch.randperm(inter, generator=gen)[:12]
                experts.gate_up_proj[e, inter + dims] *= 8.0  # the up half: i = act(gate) * up, linear in up
                experts.down_proj[e][:, dims] /= 8.0
    return model, tok, made


def test_the_dense_output_is_unchanged_by_the_rebuild():
    model, tok, _ = _rebuilt_model()
    plain, _ = load_model("tiny-moe")
    ids = tok("The river flows into the sea and the city grew.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_sparsifying_the_estimated_tolerant_half_costs_less_than_the_sensitive_half():
    model, tok, made = _rebuilt_model()
    (row,) = tolerance_split_damage(model, tok, tokens=4096, ps=[0.5], text="domains")
    tolerant, sensitive = row["tolerant"], row["sensitive"]
    assert 0.8 < tolerant["vectors"] / sensitive["vectors"] < 1.25
    # clearly less damage where the estimate said so, although the tolerant half drops at least as much
    assert tolerant["sparsity"] >= sensitive["sparsity"] - 0.05
    assert 0 < tolerant["delta_nll"] < 0.7 * sensitive["delta_nll"]
    # and the estimate named the rebuilt experts: most of each layer's sensitive half is rebuilt
    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file

    seq = sequences_from_file(tok, corpora.text_file("domains", "heldout"), seq_len=256, max_tokens=2048)
    tol = expert_tolerance_of_model(model, seq, type="i")
    j = int(abs(tol.p_grid - 0.5).argmin())
    for layer, rebuilt in enumerate(made):
        order = tol.rel_error[layer, :, j].argsort()
        sensitive_half = set(order[len(order) // 2:].tolist())
        assert len(sensitive_half & rebuilt) >= 0.75 * len(rebuilt), (layer, sorted(sensitive_half), sorted(rebuilt))
