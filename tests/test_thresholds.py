"""Static magnitude thresholds τ [L, E]: the |entry| histogram accumulator, τ from a schedule against an exact
sort-based quantile, the threshold rule against brute force, and a τ schedule realizing its target sparsity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from families import reference_activations

from moeprof.schedule import Schedule, ScheduleError, tau_from_histogram, threshold_schedule, thresholds
from moeprof.stats import ABS_BINS, ABS_EDGES, AbsHistogram, Observation, ProfileShape

TYPES = ("x", "i")
GRID = (0.5, 0.8, 0.9, 0.95)
DATA = dict(seq_len=64, batch_size=4, max_tokens=384)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """(model, tokenizer, store path, batches): tiny-moe profiled on 384 Wikipedia tokens (x and i)."""
    from moeprof.data import iter_batches
    from moeprof.models import load_model
    from moeprof.profile import profile

    model, tok = load_model("tiny-moe")
    out = tmp_path_factory.mktemp("tau") / "p.h5"
    profile(model, tok, ["wikipedia:train"], out, model_id="tiny-moe", types=TYPES, p_grid=GRID,
            show_progress=False, **DATA)
    return model, tok, out, list(iter_batches(tok, ["wikipedia:train"], **DATA))


@pytest.fixture(scope="module")
def captured(profiled):
    """{type: {(layer, expert): sorted |entries|}} recomputed from the weights (families.reference_activations)."""
    model, _, _, batches = profiled
    parts: dict = {t: {} for t in TYPES}
    for b in batches:
        _, ref = reference_activations(model, b)
        for layer, (experts, acts) in ref.items():
            for t in TYPES:
                a = acts[t].abs().double().numpy()
                for e in np.unique(experts.numpy()):
                    parts[t].setdefault((layer, int(e)), []).append(a[experts.numpy() == e].reshape(-1))
    return {t: {k: np.sort(np.concatenate(v)) for k, v in d.items()} for t, d in parts.items()}


# ---------------------------------------------------------------------------------------------------------------
# The accumulator


def test_abs_bins_are_log_spaced_twenty_per_decade_with_underflow_and_overflow():
    assert ABS_BINS == 202 and len(ABS_EDGES) == 201
    assert ABS_EDGES[0] == pytest.approx(1e-6, rel=1e-7) and ABS_EDGES[-1] == pytest.approx(1e4, rel=1e-7)
    np.testing.assert_allclose(np.diff(np.log10(ABS_EDGES)), 0.05, atol=1e-6)
    assert np.array_equal(ABS_EDGES, ABS_EDGES.astype(np.float32).astype(np.float64))  # float32 values


def test_abs_histogram_bins_hand_computed_entries():
    """0 and 5e-7 underflow (bin 0); 0.5 in [10^-0.35, 10^-0.3) = bin 114; 1.0 on its edge opens bin 121 (|a| ≥
    edge); 2e4 overflows (bin 201); the sign is ignored."""
    acc = AbsHistogram.empty(ProfileShape(1, 2, GRID), "i")
    v = torch.tensor([[0.0, 5e-7, 0.5, -0.5], [1.0, -2e4, 0.5, 0.0]])
    acc.add(Observation(0, "i", torch.tensor([1, 0]), torch.arange(2), torch.zeros(2, dtype=torch.long), vectors=v))
    want = np.zeros((1, 2, ABS_BINS), dtype=np.int64)
    np.add.at(want[0, 1], [0, 0, 114, 114], 1)
    np.add.at(want[0, 0], [121, 201, 114, 0], 1)
    np.testing.assert_array_equal(acc.counts.numpy(), want)


def test_fast_bin_index_equals_the_binary_search_at_and_beside_every_edge():
    """The CPU path (log10, then a one-bin correction) bins exactly as torch.bucketize (the GPU path) does."""
    from moeprof.stats.abs_hist import abs_bin_index

    e = torch.as_tensor(ABS_EDGES, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    v = torch.cat([torch.exp(torch.randn(20000, generator=g) * 8), e, torch.nextafter(e, torch.zeros(1)),
                   torch.nextafter(e, torch.full((1,), 1e30)), torch.tensor([0.0, 1e-45, 3e38])])
    v = v * torch.sign(torch.randn(v.shape, generator=g))
    for x in (v, v.bfloat16()):
        want = torch.bucketize(x.float().abs(), e, right=True)
        assert torch.equal(abs_bin_index(x.reshape(-1, 7 if x.numel() % 7 == 0 else 1)).reshape(-1), want)


def test_abs_histogram_equals_a_numpy_histogram_of_random_entries():
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.randn(300, 17, generator=g) * 6) * torch.sign(torch.randn(300, 17, generator=g))  # 1e-8…1e8
    ids = torch.randint(0, 3, (300,), generator=g)
    acc = AbsHistogram.empty(ProfileShape(2, 3, GRID), "x")
    for chunk in torch.split(torch.arange(300), 70):
        acc.add(Observation(1, "x", ids[chunk], chunk, torch.zeros(len(chunk), dtype=torch.long), vectors=v[chunk]))
    edges = np.concatenate([[0.0], ABS_EDGES, [np.inf]])
    for e in range(3):
        ref, _ = np.histogram(np.abs(v[ids == e].numpy().astype(np.float64)), bins=edges)
        np.testing.assert_array_equal(acc.counts[1, e].numpy(), ref)
    assert int(acc.counts[0].sum()) == 0


def test_profile_store_holds_every_entry_of_every_expert(profiled, captured):
    """The store's histogram (written by `moeprof profile`, read by the typed reader) counts each expert's entries:
    vectors × width of the sparsity statistics, and the same bins as the entries recomputed from the weights."""
    from moeprof.store import open_store

    _, _, path, _ = profiled
    with open_store(path) as st:
        for t in TYPES:
            h, sp = st.abs_histogram(t), st.sparsity(t)
            np.testing.assert_array_equal(h.counts.sum(-1), sp.vectors * sp.width[:, None])
            np.testing.assert_array_equal(h.edges, ABS_EDGES)
            edges = np.concatenate([[0.0], ABS_EDGES, [np.inf]])
            for (layer, e), a in captured[t].items():
                ref, _ = np.histogram(a.astype(np.float32).astype(np.float64), bins=edges)
                # recomputed in another order of float operations: an entry may sit one bin over at an edge
                assert np.abs(h.counts[layer, e] - ref).sum() <= 2 + a.size // 2000, (t, layer, e)


def test_store_without_the_histogram_names_the_fix(profiled, tmp_path):
    import shutil

    import h5py

    from moeprof.store import StoreError, open_store

    old = tmp_path / "old.h5"
    shutil.copy(profiled[2], old)
    with h5py.File(old, "r+") as f:
        del f["abs_hist"]
    with open_store(old) as st, pytest.raises(StoreError, match="profile again"):
        st.abs_histogram("i")


# ---------------------------------------------------------------------------------------------------------------
# τ from the histogram


def test_tau_from_histogram_hand_computed():
    edges = np.array([1.0, 10.0, 100.0])
    counts = np.array([[0, 2, 2, 0], [0, 2, 2, 0], [0, 2, 2, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    target = np.array([0.75, 0.0, np.nan, 1.0, 0.5])
    tau = tau_from_histogram(counts, target, edges, max_abs=np.array([50.0, 50.0, 50.0, 400.0, np.nan]))
    assert tau[0] == pytest.approx(10 * 10 ** 0.5)  # 3 of 4 entries: half of bin [10, 100), log-linearly
    assert tau[1] == 0.0  # nothing dropped: τ = 0 keeps every entry
    assert np.isnan(tau[2]) and np.isnan(tau[4])  # dense expert; expert with no entries
    assert tau[3] == pytest.approx(400.0)  # the overflow bin ends at the largest entry seen
    assert tau_from_histogram(np.array([4, 0, 0, 0]), np.array(0.5), edges) == pytest.approx(0.5)  # linear from 0


@pytest.mark.parametrize("t", TYPES)
def test_tau_matches_the_exact_quantile_of_the_captured_entries(profiled, captured, t):
    """τ from the store vs the sort-based quantile of each expert's entries recomputed from the weights: both lie
    in the same bin (|log10 ratio| < one bin width, 0.05), and the exact fraction of entries below τ misses the
    target by at most that bin's share of the entries."""
    _, _, path, _ = profiled
    L, E = 4, 16
    g = np.random.default_rng(1)
    target = g.uniform(0.2, 0.9, (L, E))
    s = Schedule(np.full((L, E), 0.9), t, "topp", "tiny-moe", provenance={"per_expert_sparsity": target})
    tau = thresholds(s, path)
    checked = 0
    for (layer, e), a in captured[t].items():
        if a.size < 1000:
            continue
        q = a[int(np.floor(target[layer, e] * a.size))]  # exact: a fraction `target` of the entries lies below q
        assert abs(np.log10(tau[layer, e] / q)) < 0.05 + 1e-6, (layer, e)
        below = np.searchsorted(a, tau[layer, e], side="left") / a.size
        j = np.searchsorted(ABS_EDGES, q, side="right")
        lo, hi = np.concatenate([[0.0], ABS_EDGES])[j], np.concatenate([ABS_EDGES, [np.inf]])[j]
        share = ((a >= lo) & (a < hi)).mean()
        assert abs(below - target[layer, e]) <= share + 2 / a.size, (layer, e)
        checked += 1
    assert checked >= 30


def test_uniform_schedule_targets_the_stores_sparsity_curve_at_its_p(profiled):
    """Without per-expert sparsity in its provenance, a schedule's target is the profile's mean curve at p (linear
    between grid points); NaN p stays dense (NaN τ)."""
    from moeprof.schedule import target_sparsity
    from moeprof.store import open_store

    _, _, path, _ = profiled
    p = np.full((4, 16), 0.85)
    p[2, 5] = np.nan
    s = Schedule(p, "i", "topp", "tiny-moe")
    with open_store(path) as st:
        target, sources = target_sparsity(s, st)
        mean = st.mean("i")
        tau = thresholds(s, st)
    want = (mean[..., 1] + mean[..., 2]) / 2  # p 0.85 halfway between grid points 0.8 and 0.9
    want[2, 5] = np.nan
    np.testing.assert_allclose(target, want, equal_nan=True)
    assert sources == {"provenance": 0, "curve": 63, "curve_clamped": 0}
    assert np.isnan(tau[2, 5]) and np.isfinite(np.delete(tau.reshape(-1), 2 * 16 + 5)).all()


# ---------------------------------------------------------------------------------------------------------------
# The rule and the schedule


def test_threshold_mask_keeps_entries_at_or_above_tau_brute_force():
    from moeprof.topp import apply_rule, rule_mask

    g = torch.Generator().manual_seed(3)
    v = torch.randn(5, 9, generator=g)
    v[0, 0] = 0.25
    tau = torch.tensor([0.25, 0.0, 0.7, 5.0, 1.1], dtype=torch.float64)
    mask = rule_mask(v, "threshold", tau)
    want = [[abs(float(v[r, c])) >= float(tau[r]) for c in range(9)] for r in range(5)]
    assert mask.tolist() == want
    assert mask[0, 0] and mask[1].all() and not mask[3].any()  # |a| = τ kept; τ = 0 keeps all
    out, kept = apply_rule(v, "threshold", 0.5)
    assert torch.equal(out, v * (v.abs() >= 0.5)) and kept.tolist() == (v.abs() >= 0.5).sum(-1).tolist()
    with pytest.raises(ValueError, match=">= 0"):
        rule_mask(v, "threshold", -0.1)


def test_threshold_schedule_holds_tau_above_one_and_refuses_negative_tau(tmp_path):
    tau = np.array([[0.5, 3.0, np.nan], [12.0, 0.0, 1.0]])
    s = Schedule(tau, "i", "threshold")
    s.save(tmp_path / "t.json")
    back = Schedule.load(tmp_path / "t.json")
    assert back == s and back.rule == "threshold"
    d = json.loads((tmp_path / "t.json").read_text())
    d["p"][1][0] = -0.5
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match="τ = -0.5.*>= 0"):
        Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="p = 3.0, outside"):  # the same table as top-p is refused
        Schedule(tau, "i", "topp")
    with pytest.raises(ScheduleError, match="top-p"):
        thresholds(s, tmp_path / "unused.h5")


def test_applying_the_tau_schedule_realizes_the_target_sparsity_per_expert(profiled):
    """On the tokens τ was derived from: layer 0 (whose inputs the sparsification cannot change) realizes each
    expert's target within the histogram's resolution; deeper layers see slightly shifted activations."""
    from moeprof.schedule import sparsify_

    model, _, path, batches = profiled
    g = np.random.default_rng(2)
    target = g.uniform(0.3, 0.8, (4, 16))
    ts = threshold_schedule(Schedule(np.full((4, 16), 0.9), "i", "topp", "tiny-moe",
                                     provenance={"per_expert_sparsity": target}), path)
    assert ts.rule == "threshold" and np.allclose(ts.provenance["target_sparsity"], target)
    with torch.no_grad(), sparsify_(model, ts, use_kernel=True) as handle:
        for b in batches:
            model(b)
    realized = handle.realized
    got = realized.per_expert().numpy()
    seen = realized.tokens.numpy() >= 8
    assert seen[0].sum() >= 12
    assert np.abs(got - target)[0][seen[0]].max() < 0.01
    assert np.abs(got - target)[seen].mean() < 0.01 and np.abs(got - target)[seen].max() < 0.04


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_schedule_thresholds_command_writes_the_tau_schedule(profiled, tmp_path, capsys):
    from moeprof.cli import main

    _, _, path, _ = profiled
    src = tmp_path / "s.json"
    Schedule(np.full((4, 16), 0.9), "i", "topp", "tiny-moe").save(src)
    assert main(["schedule-thresholds", str(src), "--from", str(path), "--out", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "64 of 64 experts" in out and "wrote" in out
    t = Schedule.load(tmp_path / "t.json")
    np.testing.assert_array_equal(t.p, thresholds(src, path))
    assert t.rule == "threshold" and t.provenance["target_from"]["curve"] == 64


@pytest.mark.parametrize("case, message", [
    ("negative", "τ = -1.0"), ("threshold_in", "top-p"), ("not_schedule_out", "not a moeprof schedule"),
    ("other_shape", r"\[2, 3\].*\[4, 16\]"), ("out_is_store", "is the profile store")])
def test_bad_threshold_input_is_one_line_and_exit_2(profiled, tmp_path, capsys, case, message):
    from moeprof.cli import main

    _, _, path, _ = profiled
    src, out = tmp_path / "s.json", tmp_path / "t.json"
    if case == "negative":  # a τ schedule with a negative threshold, applied by `moeprof eval`
        d = Schedule(np.full((4, 16), 0.3), "i", "threshold").to_dict()
        d["p"][0][0] = -1.0
        src.write_text(json.dumps(d))
        argv = ["eval", "tiny-moe", "--schedule", str(src), "--task", "ppl:wikipedia", "--max-tokens", "64"]
    else:
        s = {"threshold_in": Schedule(np.full((4, 16), 0.3), "i", "threshold"),
             "other_shape": Schedule(np.full((2, 3), 0.9), "i")}.get(case, Schedule(np.full((4, 16), 0.9), "i"))
        s.save(src)
        if case == "not_schedule_out":
            out.write_text("my data\n")
        argv = ["schedule-thresholds", str(src), "--from", str(path), "--out", str(out)]
        if case == "out_is_store":  # even with --force: the profile must not be replaced by a JSON file
            argv = ["schedule-thresholds", str(src), "--from", str(path), "--out", str(path), "--force"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert __import__("re").search(message, " ".join(err.split())), err
    if case == "not_schedule_out":
        assert out.read_text() == "my data\n"
    elif case != "negative":
        assert not out.exists()


def test_leaderboard_shows_each_experts_tau_and_target_sparsity(profiled):
    from rich.console import Console

    from moeprof.report import leaderboard
    from moeprof.store import open_store

    _, _, path, _ = profiled
    target = np.linspace(0.3, 0.8, 64).reshape(4, 16)
    ts = threshold_schedule(Schedule(np.full((4, 16), 0.9), "i", "topp", "tiny-moe",
                                     provenance={"per_expert_sparsity": target}), path)
    console = Console(width=250, record=True)
    with open_store(path) as st:
        console.print(leaderboard(st, type="i", p=0.9, top=0, schedule=ts))
    text = console.export_text()
    assert "sched τ" in text and "sched p" not in text
    rows = [r for r in map(str.split, text.splitlines()) if len(r) > 10 and r[0].isdigit() and r[1].isdigit()]
    assert len(rows) == 64
    for r in rows:  # rank, layer, expert, ..., sched τ, sched S (the target τ realizes on the profiled tokens)
        layer, e = int(r[1]), int(r[2])
        assert float(r[-2]) == pytest.approx(ts.p[layer, e], abs=6e-4) and float(r[-1]) == pytest.approx(
            target[layer, e], abs=6e-3)


def test_lm_eval_model_args_take_a_threshold_above_one_and_refuse_a_negative_one():
    from moeprof.evaluate.lm_eval_model import MoeprofLM

    with pytest.raises(ValueError, match="finite number >= 0"):
        MoeprofLM(pretrained="/nonexistent", type="i", rule="threshold", p=-1.0)
    with pytest.raises(Exception) as err:  # τ = 2.5 passes the check: what fails is the missing model
        MoeprofLM(pretrained="/nonexistent", type="i", rule="threshold", p=2.5)
    assert "nonexistent" in str(err.value) and "[0, 1]" not in str(err.value)
