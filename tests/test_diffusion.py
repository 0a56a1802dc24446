"""DiffusionGemma (block diffusion, transformers' `diffusion_gemma`) profiled through its own denoising generation.

One seeded generation of a tiny random DiffusionGemmaForBlockDiffusion (2 layers, 4 experts, top-2, canvas 8) runs
under `moeprof stability`'s capture, with forward pre-hooks on every experts module and dense MLP recording what the
model itself handed them. From those inputs alone (the modules' own weights, topp_mask, Jaccards of index sets)
the test recomputes: the profile (routed pairs, per-expert sparsity) and the mask stability across denoising steps
(denoiser) and across consecutive encoded positions (encoder), and compares them with the store.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from moe_families import CANVAS, build

from moeprof.topp import topp_curve, topp_mask

L, E, K, P_TOP, STEPS, GAP = 2, 4, 2, 0.9, 4, 3
PROMPT = "The capital of France is Paris"
# the site rows: per layer routed experts then the dense MLP beside them; the encoder's layers, then the denoiser's
ROWS = {(stack, layer, kind): 4 * (stack == "denoiser") + 2 * layer + (kind == "dense")
        for stack in ("encoder", "denoiser") for layer in range(L) for kind in ("routed", "dense")}


def _module_rows(model):
    """Return {module: (row, stack)} for every experts module and dense MLP, by their place in the model."""
    out = {}
    for stack, layers in (("encoder", model.model.encoder.language_model.layers), ("denoiser", model.model.decoder.layers)):
        for l, layer in enumerate(layers):
            out[layer.experts] = (ROWS[stack, l, "routed"], stack)
            out[layer.mlp] = (ROWS[stack, l, "dense"], stack)
    return out


def _record(model, calls):
    rows = _module_rows(model)
    return [m.register_forward_pre_hook(lambda mod, args: calls.append(
        (rows[mod][0], rows[mod][1], mod, args[0].detach().reshape(-1, args[0].shape[-1]).clone(),
         args[1].detach().clone() if len(args) > 1 else None))) for m in rows]


def _intermediate(mod, x, idx):
    """Return i [T, K, I] (dense: [T, 1, I]) of rows x [T, H] from the module's own weights and own gate."""
    with torch.no_grad():
        if idx is None:
            return (mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x))[:, None]
        proj = torch.einsum("tkoh,th->tko", mod.gate_up_proj[idx], x)  # [T, K, 2I] each routed pair's gate | up
        return type(mod)._apply_gate(mod, proj)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moeprof.stability import stability_run

    tok = tiny_tokenizer()
    model = build("diffusion_gemma", vocab_size=len(tok))
    stock: list = []
    hooks = _record(model, stock)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2 * CANVAS, max_denoising_steps=STEPS)
    for h in hooks:
        h.remove()
    calls: list = []
    hooks = _record(model, calls)
    out = tmp_path_factory.mktemp("dg") / "dg.h5"
    try:
        got = stability_run(model, tok, [PROMPT], out, model_id="tiny-diffusion-gemma", p=P_TOP,
                            max_new_tokens=2 * CANVAS, max_gap=GAP, denoising_steps=STEPS, seed=0,
                            show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    return model, ids.shape[1], stock, calls, got.arrays(), out


def test_generation_under_capture_routes_and_denoises_as_stock(run):
    _, _, stock, calls, _, _ = run
    assert len(calls) == len(stock) and len(calls) >= 4 * 2 * STEPS  # 4 modules per stack forward, 2 blocks
    for (row, _, _, x, idx), (row0, _, _, x0, idx0) in zip(calls, stock):
        assert row == row0 and (idx is None or torch.equal(idx, idx0))
        assert torch.allclose(x, x0, atol=1e-5)


def test_profile_of_the_generation_counts_every_pair_once_and_matches_recomputed_sparsity(run):
    from moeprof.store import open_store

    _, _, _, calls, _, out = run
    tokens = np.zeros((8, E), dtype=np.int64)
    rows: dict = {}
    for row, _, mod, x, idx in calls:
        i = _intermediate(mod, x, idx)  # [T, K, I]
        e = torch.zeros(x.shape[0], 1, dtype=torch.long) if idx is None else idx
        tokens[row] += np.bincount(e.reshape(-1).numpy(), minlength=E)
        rows.setdefault(row, []).append((e.reshape(-1), i.reshape(-1, i.shape[-1])))
    with open_store(out) as st:
        assert st.sites().kind == ["routed", "dense"] * 4 and st.sites().layer.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        np.testing.assert_array_equal(st.routing_tokens(), tokens)
        mean = st.mean("i")  # [rows, E, P]
        grid = st.p_grid
    for row, parts in rows.items():
        e = torch.cat([p[0] for p in parts])
        i = torch.cat([p[1] for p in parts]).float()
        for ex in e.unique().tolist():
            want = (1 - topp_curve(i[e == ex], grid).double() / i.shape[-1]).mean(0).numpy()
            np.testing.assert_allclose(mean[row, ex], want, atol=1.01 / i.shape[-1])


def _jaccard(a, b):
    a, b = set(a.nonzero().flatten().tolist()), set(b.nonzero().flatten().tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def _brute_force(calls):
    """Return (consecutive sum, pairs) [8, E] and gap (sum, pairs) [8, GAP] from the recorded inputs alone."""
    cons, cons_n = np.zeros((8, E)), np.zeros((8, E), dtype=np.int64)
    gap, gap_n = np.zeros((8, GAP)), np.zeros((8, GAP), dtype=np.int64)
    sequences: dict = {}  # (row, block or None, position) -> [{expert: mask} per step]
    block, encoded = -1, {}
    for row, stack, mod, x, idx in calls:
        if row == 0:  # the encoder's first layer opens a block (prompt, then each finished block)
            block += 1
        masks = topp_mask(_intermediate(mod, x, idx).float(), P_TOP)  # [T, K, I]
        e = torch.zeros(x.shape[0], 1, dtype=torch.long) if idx is None else idx
        if stack == "encoder":  # positions run on through the encoded sequence: one step per position
            start = encoded.get(row, 0)
            for t in range(x.shape[0]):
                sequences.setdefault((row, None, 0), []).append({int(e[t, k]): masks[t, k] for k in range(e.shape[1])})
            encoded[row] = start + x.shape[0]
        else:  # one denoising step of the canvas: each position's sequence grows by one step
            for t in range(x.shape[0]):
                sequences.setdefault((row, block, t), []).append({int(e[t, k]): masks[t, k]
                                                                  for k in range(e.shape[1])})
    for (row, _, _), steps in sequences.items():
        for s in range(1, len(steps)):
            for g in range(1, min(GAP, s) + 1):
                for ex in steps[s].keys() & steps[s - g].keys():
                    j = _jaccard(steps[s - g][ex], steps[s][ex])
                    gap[row, g - 1] += j
                    gap_n[row, g - 1] += 1
                    if g == 1:
                        cons[row, ex] += j
                        cons_n[row, ex] += 1
    return cons, cons_n, gap, gap_n


def test_mask_stability_across_denoising_steps_matches_brute_force(run):
    from moeprof.report.plots import plot_stability
    from moeprof.store import open_store

    _, P, _, calls, got, out = run
    cons, cons_n, gap, gap_n = _brute_force(calls)
    denoiser = [ROWS["denoiser", l, k] for l in range(L) for k in ("routed", "dense")]
    # every canvas position of each block gets STEPS - 1 consecutive pairs at its dense MLP
    blocks = sum(1 for c in calls if c[0] == 0)
    assert cons_n[ROWS["denoiser", 0, "dense"], 0] == blocks * CANVAS * (STEPS - 1)
    assert cons_n[denoiser].sum() > 0 and cons_n[[r for r in range(8) if r not in denoiser]].sum() > 0
    np.testing.assert_array_equal(got["consecutive_pairs"].numpy(), cons_n)
    np.testing.assert_array_equal(got["gap_pairs"].numpy(), gap_n)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got["consecutive_jaccard"].numpy(), cons / cons_n, atol=0.02)
        np.testing.assert_allclose(got["gap_jaccard"].numpy(), gap / gap_n, atol=0.02)
    with open_store(out) as st:
        attrs, arrays = st.stability()
        assert attrs["mode"] == "block_diffusion" and attrs["canvas_length"] == CANVAS
        assert attrs["denoiser_rows"].tolist() == sorted(denoiser)
        assert attrs["denoising_steps"] == blocks * STEPS
        np.testing.assert_array_equal(arrays["consecutive_pairs"], cons_n)
    png = plot_stability(out, out.parent)
    assert png.exists() and png.stat().st_size > 1000


def test_stability_cli_on_a_saved_diffusion_gemma_checkpoint(tmp_path, capsys):
    from moeprof.cli import main
    from moeprof.store import open_store

    tok = tiny_tokenizer()
    folder = tmp_path / "dg"
    build("diffusion_gemma", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "s.h5"
    capsys.readouterr()
    args = ["stability", str(folder), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", str(CANVAS)]
    assert main(args + ["--denoising-steps", "1"]) == 2  # no pair of denoising steps
    err = capsys.readouterr().err
    assert "no pair of denoising steps" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(args + ["--denoising-steps", "3"]) == 0, capsys.readouterr().err
    with open_store(out) as st:
        attrs, arrays = st.stability()
        assert attrs["mode"] == "block_diffusion" and attrs["denoising_steps"] == 3
        # one block: each canvas position of the denoiser's first dense MLP gives 2 consecutive pairs
        assert arrays["consecutive_pairs"][ROWS["denoiser", 0, "dense"], 0] == CANVAS * 2
