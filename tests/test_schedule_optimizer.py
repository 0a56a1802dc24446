"""The schedule optimizer on a tiny MoE whose answer is known, and the schedule / eval / generate commands."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from conftest import interrupt_mid_run, save_tiny_moe_and_text
from moeprof.cli import main
from moeprof.optimize import OptimizeConfig, allocate, expert_curves, optimize_schedule
from moeprof.critical.search import find_critical
from moeprof.schedule import Schedule

GRID = tuple(round(0.2 + 0.1 * k, 2) for k in range(8)) + (0.95, 0.975)  # coarser than the default (test time), but
# reaching the operating point: tiny-moe v2 tolerates uniform p ≈ 0.9 at 99% of its dense perplexity
SHAPE = (4, 16)  # the embedded tiny-moe: layers, experts (the fixture checks)
QUIET_SCALE = 1e-3  # down_proj of the quiet experts; 0.05 (v1's) left v2's experts sensitive: the quiet half alone at p = 0.2
# cost 11% of the calibration score
QUIET = tuple(range(SHAPE[1] // 2))  # half of every layer's experts: down_proj scaled down, sparsifying them costs ~nothing


@pytest.fixture(scope="module")
def known():
    """The embedded tiny-moe (4 layers, 16 experts, top-2) where experts 0-7 of each layer write 1000x less into
    the residual stream (down_proj scaled by QUIET_SCALE); calibration / held-out: 512 tokens of Wikipedia each."""
    from conftest import wikipedia_splits

    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    assert (model.config.num_hidden_layers, model.config.num_experts) == SHAPE
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[list(QUIET)] *= QUIET_SCALE
    splits = wikipedia_splits(model, tok, seq_len=128, max_tokens=512)
    return model, splits, expert_curves(model, splits.calibration_tokens, type="i", p_grid=GRID)


def test_optimizer_gives_insensitive_experts_lower_p_and_beats_uniform(known):
    model, splits, curves = known
    curves = copy.deepcopy(curves)  # the layer probes rescale its damage in place
    from moeprof.optimize import weight_layers_by_loss

    weight_layers_by_loss(model, splits.calibration_tokens[:2], curves, type="i")
    run = optimize_schedule(model, None, OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=4,
                                                        max_evals=8, confidence=0.5), splits=splits, curves=curves)
    s, prov = run.schedule, run.schedule.provenance
    assert prov["ratio"] >= 0.99 and prov["evaluations"] <= 8
    p = np.where(np.isnan(s.p), 1.0, s.p)  # dense counts as p = 1
    loud = [e for e in range(SHAPE[1]) if e not in QUIET]
    for layer in range(SHAPE[0]):
        assert p[layer, list(QUIET)].max() <= p[layer, loud].min(), s.p
    assert p[:, list(QUIET)].mean() < p[:, loud].mean() - 0.1, s.p
    uniform = find_critical(splits.calibration, target=0.99, dense=run.search.dense, extend=True)
    assert prov["sparsity_flop"] > uniform.critical_sparsity_flop + 0.02
    # the held-out split was scored too, and its numbers are what an independent evaluation gives
    again = splits.heldout(torch.as_tensor(s.p))
    assert prov["heldout_score"] == pytest.approx(again.score, rel=1e-9)
    assert prov["heldout_sparsity_flop"] == pytest.approx(again.sparsity_flop_overall, rel=1e-9)  # dense count 0


def test_the_default_anchored_optimizer_also_finds_the_known_answer(known):
    """The default method (uniform anchor on calibration, KL probes at its p, refinement) measuring its own curves."""
    model, splits, _ = known
    run = optimize_schedule(model, None, OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=4,
                                                        max_evals=12, p_grid=GRID, layer_probe_sequences=2),
                            splits=splits)
    s, prov = run.schedule, run.schedule.provenance
    assert prov["ratio"] >= 0.99 and prov["evaluations"] <= 12 and prov["chosen"] == "lagrangian"
    p = np.where(np.isnan(s.p), 1.0, s.p)
    loud = [e for e in range(SHAPE[1]) if e not in QUIET]
    for layer in range(SHAPE[0]):
        assert p[layer, list(QUIET)].max() <= p[layer, loud].min(), s.p
    uniform = find_critical(splits.calibration, target=0.99, dense=run.search.dense, extend=True)
    assert prov["sparsity_flop"] > uniform.critical_sparsity_flop + 0.02


def test_layer_probe_factor_is_the_measured_nll_increase(known, floor=True):
    """Each layer's factor = ΔNLL / its predicted damage at the probe p (with probe_floor, ΔNLL ≤ 0, which makes the
    layer look free, is replaced by 2·SE of the per-sequence ΔNLL), recomputed with plain perplexity forwards."""
    import math

    from moeprof.capture import sparsify
    from moeprof.optimize import weight_layers_by_loss
    from moeprof.evaluate.perplexity import perplexity

    model, splits, curves = known
    c = copy.deepcopy(curves)
    seqs = splits.calibration_tokens[:2]  # as the known-answer test: layer 1's probe measures no increase
    factors = weight_layers_by_loss(model, seqs, c, type="i", probe_p=0.5, probe_floor=floor)
    dense = perplexity(model, seqs)
    j = GRID.index(0.5)
    for layer in range(SHAPE[0]):
        table = torch.full(SHAPE, float("nan"), dtype=torch.float64)
        table[layer] = 0.5
        with sparsify(model, type="i", p=table):
            sparse = perplexity(model, seqs)
        delta = math.log(sparse.ppl) - math.log(dense.ppl)
        d = sparse.seq_nll / sparse.seq_tokens - dense.seq_nll / dense.seq_tokens
        noise = 2 * d.std(ddof=1) / math.sqrt(d.size)
        want = max(delta if delta > 0 or not floor else noise, 1e-6) / np.nansum(curves.damage[layer, :, j])
        assert factors[layer] == pytest.approx(want, rel=1e-6)
        assert (layer in c.probe_unresolved) == (delta <= 0)
    assert c.probe_unresolved  # the case the floor is for does occur here
    np.testing.assert_allclose(c.damage, curves.damage * factors[:, None, None], rtol=1e-12)


def test_allocation_follows_the_multiplier_and_keeps_starved_experts_dense(known):
    model, splits, curves = known
    none, s0, _ = allocate(curves, 0.0)
    assert np.isnan(none).all() and s0 == 0.0  # no reward for sparsity: everything dense
    lows = [allocate(curves, lam)[1] for lam in (1e-3, 1e-1, 1e1, 1e3)]
    assert lows == sorted(lows) and lows[-1] > 0.5  # predicted sparsity grows with the multiplier
    starved = int(np.argmin(np.where(curves.tokens[0] > 0, curves.tokens[0], 10**9)))
    table, _, safe = allocate(curves, 1e3, min_tokens=int(curves.tokens[0, starved]) + 1)
    assert [0, starved] in safe and np.isnan(table[0, starved])


# ------------------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    return (*save_tiny_moe_and_text(root), root)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def test_schedule_command_writes_a_schedule_that_eval_and_generate_apply(setup, capsys):
    ckpt, data, root = setup
    out = root / "s.json"
    code, text, err = run(capsys, "schedule", ckpt, "--task", f"ppl:{data}", "--seq-len", 32, "--max-tokens", 512,
                          "--batch-size", 4, "--max-evals", 8, "--min-tokens", 4, "--out", out)
    assert code == 0, err
    s = Schedule.load(out)
    prov = s.provenance
    assert s.p.shape == (2, 7) and prov["evaluations"] <= 8 and prov["calibration"] != prov["heldout"]
    assert "calibration" in text and "held-out" in text
    from moeprof.optimize.verdict import verdict_lines  # the verdict is printed and kept in the provenance

    lines = verdict_lines(prov)
    assert lines and all(" ".join(line.split()) in text for line in lines) and "verdict on" in text
    code, text, err = run(capsys, "eval", ckpt, "--schedule", out, "--task", f"ppl:{data}", "--seq-len", 32,
                          "--max-tokens", 512, "--batch-size", 4)
    assert code == 0, err
    assert "ratio" in text and "sparsity (FLOP)" in text
    assert f"verdict on ppl:{data}" in text and "target 0.99" in text  # the same verdict, on the task given
    code, text, err = run(capsys, "generate", ckpt, "--schedule", out, "--prompt", "Routers send", "--max-new-tokens", 4)
    assert code == 0, err
    assert "tok/s" in text and "realized sparsity" in text


def test_eval_prints_the_ratio_of_independent_dense_and_sparse_perplexities(setup, capsys):
    from moeprof.capture import sparsify
    from moeprof.evaluate.perplexity import perplexity, sequences_from_file
    from moeprof.models import load_model

    ckpt, data, _ = setup
    code, text, err = run(capsys, "eval", ckpt, "--type", "i", "--p", 0.6, "--task", f"ppl:{data}", "--seq-len", 32,
                          "--max-tokens", 256)
    assert code == 0, err
    model, tok = load_model(str(ckpt))
    seqs = sequences_from_file(tok, data, seq_len=32, max_tokens=256)
    dense = perplexity(model, seqs).ppl
    with sparsify(model, type="i", p=0.6):
        sparse = perplexity(model, seqs).ppl
    # the row: dense ppl, sparse ppl, ppl ÷ dense, the score ratio 1/ppl the target is checked on
    cells = [f"{dense:.4g}", f"{sparse:.4g}", f"{sparse / dense:.4f}", f"{dense / sparse:.4f}"]
    assert re.search(r"\s*│\s*".join(map(re.escape, cells)), text), text
    assert "perplexity" in text and "ppl ÷" in text


@pytest.mark.parametrize("argv, message", [
    (["schedule", "{ckpt}", "--task", "ppl:{data}", "--target", "1.5", "--out", "{root}/t.json"], "--target must lie"),
    (["schedule", "{ckpt}", "--task", "ppl:{data}", "--target", "0", "--out", "{root}/t.json"], "--target must lie"),
    (["eval", "{ckpt}", "--schedule", "{root}/notjson.json", "--task", "ppl:{data}"], "is not JSON"),
    (["eval", "{ckpt}", "--schedule", "{root}/shape.json", "--task", "ppl:{data}"], "this model is [layers 2"),
    (["generate", "{ckpt}", "--schedule", "{root}/version.json", "--prompt", "a"], "schema version 9"),
    (["eval", "{ckpt}", "--task", "ppl:{data}"], "give --schedule FILE"),
])
def test_bad_schedule_input_is_one_line_and_exit_2(setup, capsys, argv, message):
    ckpt, data, root = setup
    (root / "notjson.json").write_text("{p: ")
    (root / "shape.json").write_text(json.dumps(Schedule(np.full((3, 7), 0.9), "i").to_dict()))
    d = Schedule(np.full((2, 7), 0.9), "i").to_dict()
    d["schema_version"] = 9
    (root / "version.json").write_text(json.dumps(d))
    code, out, err = run(capsys, *[a.format(ckpt=ckpt, data=data, root=root) for a in argv])
    assert code == 2 and message in err
    assert not (root / "t.json").exists()


def test_interrupted_schedule_run_leaves_no_file(setup, capsys, monkeypatch):
    import moeprof.optimize as allocate_mod

    ckpt, data, root = setup
    out = root / "interrupted.json"
    older = json.dumps(Schedule(np.full((2, 7), 0.5), "i").to_dict())  # an older schedule the user keeps
    out.write_text(older)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(allocate_mod, "optimize_schedule", interrupted)
    code, out_text, err = run(capsys, "schedule", ckpt, "--task", f"ppl:{data}", "--out", out)
    assert code == 130 and "interrupted" in err and "wrote nothing" in " ".join(out_text.split())  # not 2: bad input
    assert out.read_text() == older
    assert [p.name for p in root.iterdir() if p.name.startswith(".interrupted")] == []


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_inside_the_real_optimizer_exits_130_or_143_and_writes_no_file(setup, tmp_path, signame, status):
    """A real SIGINT / SIGTERM (not an injected exception), delivered inside the optimizer of a real run (as its
    expert curves start: the model is loaded and the calibration split built): exit 130 / 143, as profile and
    critical, so that a job scheduler tells pre-emption from bad input (exit 2)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    ckpt, data, _ = setup
    out = tmp_path / "s.json"
    older = json.dumps(Schedule(np.full((2, 7), 0.5), "i").to_dict())  # an older schedule (anything else is refused)
    out.write_text(older)
    script = textwrap.dedent(f"""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent may have left SIGINT ignored
        import moeprof.optimize.optimizer as allocate
        real = allocate.expert_curves
        def curves_then_sigint(*a, **k):
            os.kill(os.getpid(), signal.{signame})
            return real(*a, **k)
        allocate.expert_curves = curves_then_sigint
        from moeprof.cli import main
        sys.exit(main(["schedule", {str(ckpt)!r}, "--task", "ppl:{data}", "--seq-len", "32", "--max-tokens", "128",
                       "--batch-size", "4", "--max-evals", "3", "--min-tokens", "1", "--out", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == status, proc.stderr
    said = "terminated" if signame == "SIGTERM" else "interrupted"
    assert "Traceback" not in proc.stderr and f"{said}: the file being written was discarded" in " ".join(
        proc.stderr.split()), proc.stderr
    assert "wrote nothing to" in " ".join(proc.stdout.split()), proc.stdout
    # the schedule file untouched; beside it only the journal of the evaluations completed before the signal
    assert out.read_text() == older and sorted(p.name for p in tmp_path.iterdir()) in (
        ["s.json"], ["s.json", "s.json.journal"])


def test_interrupt_while_the_schedule_file_is_half_written_keeps_the_old_one(setup, tmp_path, capsys, monkeypatch):
    import moeprof.atomic as atomic
    import moeprof.optimize as allocate_mod
    from moeprof.optimize import ScheduleResult

    ckpt, data, _ = setup
    finished = ScheduleResult(Schedule(np.full((2, 7), 0.9), "i"), None, None, None, None)  # the optimizer's outcome
    monkeypatch.setattr(allocate_mod, "optimize_schedule", lambda *a, **k: finished)
    out = tmp_path / "s.json"
    older = json.dumps(Schedule(np.full((2, 7), 0.5), "i").to_dict())  # an older schedule (anything else is refused)
    out.write_text(older)

    def half_written(path, text):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text(text[:10])
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "write_text", half_written)
    code, _, err = run(capsys, "schedule", ckpt, "--task", f"ppl:{data}", "--seq-len", 32, "--max-tokens", 128,
                       "--batch-size", 4, "--max-evals", 3, "--min-tokens", 1, "--out", out)
    assert code == 130 and err.startswith("interrupted:"), err
    assert out.read_text() == older and [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_generate_compare_prints_dense_and_sparsified_text_side_by_side(setup, capsys):
    from moeprof.capture import sparsify
    from moeprof.cli.schedule import first_difference
    from moeprof.models import load_model

    ckpt, _, _ = setup
    code, text, err = run(capsys, "generate", ckpt, "--type", "i", "--p", 0.3, "--prompt", "Routers send",
                          "--max-new-tokens", 6, "--compare")
    assert code == 0, err
    model, tok = load_model(str(ckpt))  # the reference: greedy generation without and with sparsify
    enc = tok("Routers send", return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        dense = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, n:].tolist()
        with sparsify(model, type="i", p=0.3):
            sparse = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, n:].tolist()
    row = re.search(r"│ (.*?) │ (.*?) │", text[text.index("sparsified (i at p 0.3)"):])
    assert " ".join(row[1].split()) == " ".join(tok.decode(dense, skip_special_tokens=True).split())
    assert " ".join(row[2].split()) == " ".join(tok.decode(sparse, skip_special_tokens=True).split())
    assert f"the same for the first {first_difference(dense, sparse)} of 6 new tokens" in text
    assert "timing: wall-clock greedy decode, batch 1, prefill excluded" in text


def test_decode_speed_ceiling_is_one_over_the_unskipped_weight_share():
    from moeprof.report.decode_speed import speed_ceiling, timing_note

    assert speed_ceiling("i", 0.6) == pytest.approx(1 / (1 - 0.6 / 3))  # 1.25: down is a third of the weights
    assert speed_ceiling("x", 0.5) == pytest.approx(1.5)  # gate and up, two thirds
    assert speed_ceiling("g", 0.9) == 1.0 and speed_ceiling("u", 0.9) == 1.0
    slow = timing_note("i", 0.6, 0.75)
    assert "ceiling at sparsity 0.600 of i is 1.25x" in slow and "below 1 (0.75x)" in slow and "sort per row" in slow
    assert "below 1" not in timing_note("i", 0.6, 1.1)


def test_an_interrupted_schedule_run_resumes_from_its_journal_to_the_uninterrupted_schedule(setup, tmp_path, capsys):
    import signal

    from moeprof.evaluate.journal import journal_path

    ckpt, data, _ = setup
    argv = [ckpt, "--task", f"ppl:{data}", "--seq-len", 32, "--max-tokens", 128, "--batch-size", 4, "--max-evals", 5,
            "--min-tokens", 1]
    whole, resumed = tmp_path / "whole.json", tmp_path / "resumed.json"
    code, _, err = run(capsys, "schedule", *argv, "--out", whole)
    assert code == 0, err
    assert not journal_path(whole).exists()

    journal = journal_path(resumed)
    code, out, err = interrupt_mid_run("schedule", [*argv, "--out", resumed], journal, pause_at=2,
                                       marker='"point_id"', signum=signal.SIGTERM)
    assert code == 143, err
    assert "2 completed evaluations are kept in" in " ".join(out.split()), out
    assert not resumed.exists() and journal.read_text().count('"point_id"') == 2

    code, out, err = run(capsys, "schedule", *argv, "--out", resumed)
    assert code == 0, err
    assert "resuming: 2 evaluations" in out, out
    assert not journal.exists()
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    assert a == b
    assert a["provenance"]["evaluations"] > 2  # the resumed run had evaluations left to make


def test_schedule_refuses_a_negative_min_tokens_before_loading_the_model(tmp_path, capsys):
    from conftest import refused

    refused(capsys, "schedule", "tiny-moe", "--task", "ppl:wikipedia", "--min-tokens", "-3", "--out",
            tmp_path / "s.json", match="--min-tokens")


def test_schedule_out_that_is_a_folder_suggests_a_schedule_file(tmp_path, capsys):
    from conftest import refused

    err = refused(capsys, "schedule", "tiny-moe", "--task", "ppl:wikipedia", "--out", tmp_path, match="is a folder")
    assert "profile.h5" not in err and "schedule.json" in err
