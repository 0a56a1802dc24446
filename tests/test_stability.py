"""Mask stability (moeprof.stability): hand-built masks with known Jaccard; tiny-moe and SmolLM2 decoding against a
brute-force recomputation from one full forward of the generated sequence; the store, the plot and the bad-input
lines."""

import numpy as np
import pytest
import torch

from moeprof.cli import main
from moeprof.stability import StabilityStats, jaccard
from moeprof.store import open_store
from moeprof.topp import topp_mask


def m(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_jaccard_of_hand_built_masks():
    assert float(jaccard(m(1, 1, 0, 0), m(1, 0, 1, 0))) == pytest.approx(1 / 3)
    assert float(jaccard(m(1, 1, 1, 0), m(1, 1, 1, 0))) == 1.0
    assert float(jaccard(m(0, 0), m(0, 0))) == 1.0  # identical (empty) kept-sets
    assert float(jaccard(m(1, 0), m(0, 1))) == 0.0


def test_consecutive_drift_and_gap_on_a_hand_built_sequence():
    a, b, c = m(1, 1, 0, 0), m(1, 0, 1, 0), m(1, 1, 1, 1)
    # expert 0 serves steps 0, 1, 3; expert 1 serves steps 1, 2
    steps = [{0: a}, {0: b, 1: a}, {1: c}, {0: c}]
    st = StabilityStats.empty(1, 2, 3)
    st.add_sequence(0, steps)
    out = st.arrays()
    # consecutive: expert 0 (0,1): J(a,b) = 1/3; expert 1 (1,2): J(a,c) = 1/2; expert 0 (2,3): not served at 2
    assert out["consecutive_pairs"].tolist() == [[1, 1]]
    assert out["consecutive_jaccard"][0].tolist() == pytest.approx([1 / 3, 1 / 2])
    # drift: expert 0 vs a at steps 1 (1/3) and 3 (J(a,c) = 1/2); expert 1 vs a at step 2 (1/2)
    assert out["drift_jaccard"][0].tolist() == pytest.approx([(1 / 3 + 1 / 2) / 2, 1 / 2])
    # gap 1: 1/3, 1/2; gap 2: expert 0 (1,3): J(b,c) = 1/2; gap 3: expert 0 (0,3): J(a,c) = 1/2
    assert out["gap_pairs"][0].tolist() == [2, 1, 1]
    assert out["gap_jaccard"][0].tolist() == pytest.approx([(1 / 3 + 1 / 2) / 2, 1 / 2, 1 / 2])
    assert out["drift_gap_jaccard"][0].tolist() == pytest.approx([(1 / 3 + 1 / 2) / 2, np.nan, 1 / 2],
                                                                 nan_ok=True)
    merged = st.merge(st).arrays()
    assert merged["gap_pairs"][0].tolist() == [4, 2, 2]
    assert merged["gap_jaccard"][0].tolist() == pytest.approx(out["gap_jaccard"][0].tolist())


class Rows:
    """Observer keeping the i rows, token positions and experts of one forward (brute-force reference)."""

    type = "i"

    def __init__(self):
        self.rows = {}

    def add(self, obs):
        if obs.type == "i":
            self.rows[obs.layer] = (obs.vectors.float(), obs.token_idx.tolist(), obs.expert_ids.tolist())


@pytest.mark.parametrize("name, N", [("tiny-moe", 12), ("smollm2", 6)])  # an MoE, and a real dense model
def test_decoding_matches_brute_force_masks_of_the_full_sequence(tmp_path, name, N):
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, attach
    from moeprof.models import load_model
    from moeprof.report.plots import plot_stability
    from moeprof.stability import stability_run
    from moeprof.store import open_store

    model, tok = load_model(name)
    prompt, p = "The river ran past the old mill", 0.9
    out = tmp_path / "s.h5"
    got = stability_run(model, tok, [prompt], out, model_id=name, p=p, max_new_tokens=N, max_gap=4,
                        show_progress=False).arrays()

    ids = tok(prompt, return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=N, do_sample=False, pad_token_id=tok.eos_token_id)
    P, steps = ids.shape[1], gen.shape[1] - ids.shape[1]
    sites = adapter_for(model).sites(model)
    rows = Rows()
    with attach(model, Engine(sites, observers=[rows])), torch.inference_mode():
        model(input_ids=gen[:, :-1], use_cache=False)  # every computed position in one forward, no KV cache
    ref = StabilityStats.empty(len(sites), sites[0].num_experts, 4)
    for layer, (v, tpos, experts) in rows.rows.items():
        masks = topp_mask(v, p)
        seq = [{} for _ in range(steps)]
        for n, (t, e) in enumerate(zip(tpos, experts)):
            if t >= P - 1:
                seq[t - P + 1][e] = masks[n]
        ref.add_sequence(layer, seq)
    want = ref.arrays()
    assert int(want["consecutive_pairs"].sum()) > 10
    assert torch.equal(got["consecutive_pairs"], want["consecutive_pairs"])
    assert torch.equal(got["gap_pairs"], want["gap_pairs"])
    np.testing.assert_allclose(got["gap_jaccard"], want["gap_jaccard"], atol=0.02)
    np.testing.assert_allclose(got["drift_jaccard"], want["drift_jaccard"], atol=0.02)

    with open_store(out) as st:
        attrs, arrays = st.stability()
        assert attrs["mode"] == "autoregressive" and attrs["p"] == p and attrs["type"] == "i"
        np.testing.assert_array_equal(arrays["consecutive_pairs"], got["consecutive_pairs"].numpy())
        assert st.routing_tokens()[0].sum() == (P + steps - 1) * st.attrs["top_k"]  # the profile of the same run
        from moeprof.stats import STATISTICS
        from moeprof.store import schema_table

        table = {f.name: f for f in schema_table(STATISTICS)}
        for name, _, _, doc, units in st.layout():
            if name.startswith("stability/"):
                assert name in table and doc == table[name].doc and units == table[name].units
    png = plot_stability(out, tmp_path)
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.parametrize("content, args, needle", [
    ("", [], "holds no prompt"),
    ("hello there\n", ["--max-new-tokens", "1"], "no pair of decode steps"),
    ("hello there\n", ["--max-new-tokens", "100000"], "leaves no room"),
])
def test_bad_prompt_files_get_one_line(tmp_path, capsys, content, args, needle):
    from moeprof.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    out = tmp_path / "s.h5"
    assert main(["stability", "tiny-moe", "--prompts", str(prompts), "--out", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and not out.exists()


def _qwen2_stability(qwen2_moe, out, *, max_new_tokens: int):
    """Load the tiny Qwen2-MoE fixture, write its stability store of one prompt to `out`; return (model, tokenizer)."""
    from moeprof.models import load_model
    from moeprof.stability import stability_run

    folder, _, _ = qwen2_moe
    model, tok = load_model(str(folder))
    stability_run(model, tok, ["The capital of France"], out, model_id="q", max_new_tokens=max_new_tokens,
                  max_gap=2, show_progress=False)
    return model, tok


def test_stability_store_records_the_decoder_layer_of_each_site_and_is_not_merged(qwen2_moe, tmp_path, capsys):
    from moeprof.stability import stability_run

    out = tmp_path / "st.h5"
    model, tok = _qwen2_stability(qwen2_moe, out, max_new_tokens=3)
    with open_store(out) as st:
        assert st.sites().kind == ["dense", "routed", "shared"]
        assert st.sites().layer.tolist() == [0, 1, 1]
        assert st.sites().label(2) == "1 shared"
    other = tmp_path / "st2.h5"
    stability_run(model, tok, ["A mixture of experts"], other, model_id="q", max_new_tokens=3, max_gap=2,
                  show_progress=False)
    code = main(["merge", str(out), str(other), "-o", str(tmp_path / "m.h5")])  # it would drop /stability
    assert code == 2 and "/stability" in capsys.readouterr().err and not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize("line", ["{not json", "[1, 2]"])
def test_stability_prompt_file_with_a_bad_jsonl_line_is_one_line_error(tmp_path, capsys, line):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["stability", "tiny-moe", "--prompts", str(prompts), "--out", str(tmp_path / "s.h5")]) == 2
    err = capsys.readouterr().err
    assert f"line 2 of {prompts} is not a JSON object" in err and len(err.strip().splitlines()) == 1, err


def test_stability_into_a_store_of_another_shape_is_refused_before_generating(qwen2_moe, tmp_path):
    from moeprof.models import load_model
    from moeprof.schedule import Schedule
    from moeprof.stability import stability_run
    from moeprof.store import StoreError, write_schedule

    folder, _, store = qwen2_moe
    target = tmp_path / "held.h5"
    target.write_bytes(store.read_bytes())
    write_schedule(target, "s", Schedule(np.full((3, 4), 0.5), "i"))
    model, tok = load_model("tiny-moe")  # [4 layers, 8 experts]: /schedules would not fit

    def refuse(*a, **k):
        raise AssertionError("generated before refusing")

    model.generate = refuse
    before = target.read_bytes()
    with pytest.raises(StoreError, match=r"holds /schedules of a model with \[layers, experts\] = \(3, 4\)"):
        stability_run(model, tok, ["The capital"], target, model_id="tiny-moe", max_new_tokens=3, show_progress=False)
    assert target.read_bytes() == before


def test_chance_jaccard_matches_a_hand_computation_and_a_monte_carlo_estimate():
    from moeprof.report.chance import chance_jaccard

    assert chance_jaccard(4, 2) == pytest.approx(7 / 18)  # by hand: P(I=0,1,2) = 1/6, 4/6, 1/6; J = 0, 1/3, 1
    assert chance_jaccard(10, 0) == 1.0 and chance_jaccard(10, 10) == 1.0
    rng = np.random.default_rng(0)
    for n, k in ((16, 5), (48, 24), (96, 80)):
        trials = 20000
        a = rng.random((trials, n)).argsort(1) < k  # independent uniform k-subsets
        b = rng.random((trials, n)).argsort(1) < k
        j = (a & b).sum(1) / (a | b).sum(1)
        assert chance_jaccard(n, k) == pytest.approx(j.mean(), abs=4 * j.std() / np.sqrt(trials))
    s = 0.5  # large n: (1 - s) / (1 + s)
    assert chance_jaccard(4000, 2000) == pytest.approx((1 - s) / (1 + s), abs=1e-3)


def test_stability_plot_draws_the_chance_level_and_the_summary_says_it(qwen2_moe, tmp_path):
    from moeprof.report.chance import chance_jaccard, chance_levels, stability_summary
    from moeprof.report.plots import stability_figure

    out = tmp_path / "st.h5"
    _qwen2_stability(qwen2_moe, out, max_new_tokens=4)
    with open_store(out) as st:
        sp = st.sparsity("i")
        j = int(np.argmin(np.abs(st.p_grid - 0.9)))
        want = []
        for r in range(st.num_layers):  # by hand: each row's vector-weighted sparsity → k kept of its width
            w = sp.vectors[r].astype(float)
            s = float(np.nansum(sp.mean[r, :, j] * w) / w.sum())
            want.append(chance_jaccard(int(sp.width[r]), round((1 - s) * int(sp.width[r]))))
        levels = chance_levels(st, "i", 0.9)
        np.testing.assert_allclose(levels, want)
        fig = stability_figure(st)
    for ax in fig.axes:
        (line,) = [l for l in ax.lines if l.get_label().startswith("chance")]
        assert np.allclose(line.get_ydata(), np.mean(want))
        assert f"({np.mean(want):.3f})" in line.get_label()
    line = stability_summary(0.35, 0.3, 0.34, 120)
    assert "chance level (two independent masks of the same sparsity) 0.340" in line and "at chance level" in line
    assert "2.00× chance" in stability_summary(0.68, 0.5, 0.34, 120)


@pytest.mark.parametrize("content, message", [
    (b"\x83\xff\x00binary", "is not UTF-8 text"),                                      # D16: was a bare codec error
    (b'{"prompt": 5}\n', "line 1 of {path}: 'prompt' must be a string, got 5"),     # D16: was used as "5"
    (b'{"prompt": "fine"}\n{"title": "no prompt"}\n', "line 2 of {path} has no 'prompt'"),  # D16: was skipped
])
def test_stability_prompt_file_that_is_not_prompts_is_one_line_naming_it(tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content)
    assert main(["stability", "tiny-moe", "--prompts", str(prompts), "--out", str(tmp_path / "s.h5")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.format(path=prompts) in err and str(prompts) in err, err


@pytest.mark.parametrize("gap", ["0", "-2"])
def test_stability_refuses_a_max_gap_below_one_before_loading_the_model(tmp_path, capsys, gap):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert main(["stability", "tiny-moe", "--prompts", str(prompts), "--max-gap", gap,
                 "--out", str(tmp_path / "s.h5")]) == 2
    err = capsys.readouterr().err
    assert f"--max-gap {gap}" in err and len(err.strip().splitlines()) == 1, err
