"""`moeprof schedule --from STORE`: the store's uniform critical p is the optimizer's anchor (verified with one
calibration evaluation, searched on its denser side only when it fails); a record of another type, task, target
or model is not used, with one line saying so; the expert curves are still measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_EXPERT_TEXT

from moeprof.cli import main
from moeprof.evaluate.task import TaskSplits
from moeprof.optimize import DEFAULT_GRID, OptimizeConfig, optimize_schedule, uniform_anchor
from moeprof.critical.search import find_critical
from moeprof.evaluate.point import EvalPoint
from test_schedule_anchor import _linear  # the same synthetic evaluator

GRID = tuple(round(0.2 + 0.1 * k, 2) for k in range(8)) + (0.95,)  # coarse (test time), as test_schedule_anchor


@pytest.mark.parametrize("search", ["critical", "grid"])
def test_a_passing_start_is_the_anchor_after_one_evaluation(search):
    calls: list = []
    evaluate = _linear(0.2, calls)  # crossing at 0.95
    a = uniform_anchor(evaluate, DEFAULT_GRID, evaluate(None), target=0.99, budget=9, search=search, start=0.96)
    assert a.p == 0.96 and calls == [None, 0.96] and len(a.evaluations) == 1 and a.evaluations[0]["passed"]
    assert a.point.score == pytest.approx(1 - 0.2 * 0.04)


@pytest.mark.parametrize("slope, start", [(0.2, 0.9), (0.5, 0.6), (0.05, 0.5)])
def test_a_failing_start_is_searched_on_its_denser_side_only(slope, start):
    calls: list = []
    evaluate = _linear(slope, calls)
    crossing = 1 - 0.01 / slope
    a = uniform_anchor(evaluate, DEFAULT_GRID, evaluate(None), target=0.99, budget=9, start=start)
    assert calls[1] == start and not a.evaluations[0]["passed"]  # verified first, and it fails
    assert all(p > start for p in calls[2:])  # nothing at or below the failing start is evaluated again
    assert crossing - 1e-9 <= a.p <= crossing + 0.005  # the passing end of a ≤ tol bracket around the crossing
    assert len(a.evaluations) == len(calls) - 1 == len({round(p, 10) for p in calls[1:]})  # each p counted once
    grid_calls: list = []
    g = uniform_anchor(_linear(slope, grid_calls), DEFAULT_GRID, EvalPoint(p=None, score=1.0), target=0.99, budget=9,
                       search="grid", start=start)
    passing = [p for p in DEFAULT_GRID if 1 - slope * (1 - p) >= 0.99 - 1e-12]  # brute force over the grid
    assert g.p == min(passing) and grid_calls[0] == start and all(p > start for p in grid_calls[1:])


def test_a_start_that_is_not_sparse_is_refused():
    with pytest.raises(ValueError, match="start must be"):
        uniform_anchor(_linear(0.2, []), DEFAULT_GRID, EvalPoint(p=None, score=1.0), target=0.99, budget=9, start=1.0)


# ------------------------------------------------------------------------------ what the store gives (no torch)


@pytest.fixture
def store(tmp_path):
    from test_report import MOE_PLAN, build_store

    return build_store(tmp_path / "p.h5", MOE_PLAN, model="m", num_experts=6)  # 2 layers, 6 experts, types x, i


def _record(store, *, type="i", rule="topp", task="ppl:wikipedia", target=0.99, p=0.85, **attrs):
    from moeprof.store import Critical, write_critical

    write_critical(store, Critical({"type": type, "rule": rule, "task": task, "target": target, "critical_p": p,
                                    "critical_ratio": 0.991, "num_evaluations": 7, "seq_len": 256,
                                    "max_tokens": 8192, "tokens": 8192, **attrs}))


def test_the_matching_record_gives_its_critical_p_and_its_provenance(store):
    from moeprof.critical.pipeline import stored_anchor

    _record(store, type="x", p=0.5)
    _record(store, p=0.85)
    a = stored_anchor(store, type="i", rule="topp", task="ppl:wikipedia", target=0.99)
    assert a.p == 0.85 and a.source["store"] == str(store) and a.source["record"] == "critical/i/topp/ppl:wikipedia"
    assert a.source["num_evaluations"] == 7 and a.source["tokens"] == 8192
    # the stored search of ppl:<corpus> ran on the corpus's held-out split: the one the schedule is scored on
    assert a.source["search_data"] == "wikipedia:heldout" and a.source["heldout_overlap"] is True
    assert "0.8500" in a.note and "not independent" in a.note


@pytest.mark.parametrize("kwargs, record, why", [
    ({}, None, "holds no /critical record"),
    ({}, {"type": "x"}, "are not of type i, rule topp, task ppl:wikipedia"),
    ({}, {"task": "ppl:owt"}, "(i/topp/ppl:owt) are not of type i"),
    ({}, {"rule": "maxp", "p": 0.2}, "(i/maxp/ppl:wikipedia) are not"),
    ({}, {"target": 0.98}, "is for target 0.98, not 0.99"),
    ({}, {"target": float("nan")}, "is for target nan, not 0.99"),
    ({"identity": {"model": "mine"}}, {"model": "theirs"}, "model 'theirs', this model's is 'mine'"),
    ({}, {"p": 1.0}, "reached no sparse p"),
])
def test_a_record_of_another_type_task_target_or_model_is_not_used(store, kwargs, record, why):
    from moeprof.critical.pipeline import stored_anchor

    if record is not None:
        _record(store, **record)
    a = stored_anchor(store, type="i", rule="topp", task="ppl:wikipedia", target=0.99, **kwargs)
    assert a.p is None and a.source is None and why in a.note and "the uniform anchor is searched" in a.note
    assert "\n" not in a.note


def test_an_lm_eval_record_overlaps_the_heldout_documents_only_when_it_searched_more_than_the_calibration(store):
    from moeprof.critical.pipeline import stored_anchor

    _record(store, task="arc_easy", limit=50)
    a = stored_anchor(store, type="i", rule="topp", task="arc_easy", target=0.99, limit=50)
    assert a.source["search_data"] == "arc_easy documents [0, 50)" and a.source["heldout_overlap"] is False
    assert stored_anchor(store, type="i", rule="topp", task="arc_easy", target=0.99, limit=20).source[
        "heldout_overlap"] is True  # documents [20, 40) are the schedule's held-out


# ------------------------------------------------------------------------ the optimizer on the embedded tiny-moe


@pytest.fixture(scope="module")
def tiny_moe_text():
    """The embedded tiny-moe and 2 x 64 Wikipedia tokens per split (as test_schedule_anchor), the calibration
    evaluator counting its calls: the independent count of full evaluations."""
    from moeprof import corpora
    from moeprof.evaluate.perplexity import sequences_from_file
    from moeprof.evaluate.runners import perplexity_evaluator
    from moeprof.models import load_model

    model, tok = load_model("tiny-moe")
    cal = sequences_from_file(tok, corpora.text_file("wikipedia", "train"), seq_len=64, max_tokens=128)
    held = sequences_from_file(tok, corpora.text_file("wikipedia", "heldout"), seq_len=64, max_tokens=128)
    calls: list = []
    inner = perplexity_evaluator(model, cal, type="i")

    def calibration(p):
        calls.append(None if p is None else p)
        return inner(p)

    splits = TaskSplits(calibration, perplexity_evaluator(model, held, type="i"), cal,
                        {"calibration": "wikipedia:train", "heldout": "wikipedia:heldout"})
    uniform = find_critical(inner, target=0.99, extend=True)  # the calibration split's own uniform critical p
    assert 0.2 < uniform.critical_p < 1
    return model, splits, calls, uniform


def _optimize(tiny_moe_text, start, max_evals=8):
    model, splits, calls, _ = tiny_moe_text
    calls.clear()
    rows: list = []
    config = OptimizeConfig(type="i", task="synthetic", target=0.99, min_tokens=2, p_grid=GRID,
                            layer_probe_sequences=2, max_evals=max_evals, anchor_start=start,
                            anchor_source={"store": "s.h5"}, confidence=0.5)  # the point rule: these tests
    # check the stored anchor's plumbing against the fixture's own point-estimate critical p
    run = optimize_schedule(model, None, config, splits=splits, on_eval=rows.append)
    return run.schedule.provenance, rows, list(calls)


def test_a_passing_stored_anchor_costs_one_evaluation(tiny_moe_text):
    uniform = tiny_moe_text[3]
    start = round(min(uniform.critical_p + 0.02, 0.99), 4)  # denser than the critical p: passes
    prov, rows, calls = _optimize(tiny_moe_text, start)
    assert prov["anchor_from"] == "store" and prov["anchor_p"] == start and prov["curves_from"] == "measured"
    assert prov["anchor_store"] == {"store": "s.h5", "p": start, "passed": True}
    anchor_rows = [r for r in rows if r.get("label", "").startswith("uniform p")]
    assert len(anchor_rows) == len(prov["anchor_search"]) == 1 and "from the store" in anchor_rows[0]["label"]
    assert calls[:2] == [None, start]  # dense, then the stored p, on the calibration split
    # the count is honest: every calibration evaluation (dense included), counted at the evaluator
    assert prov["evaluations"] == len(calls) == 1 + 1 + len(prov["search"]) <= 8
    assert prov["layer_probe_p"] == start  # the probes run at the stored operating point


def test_a_failing_stored_anchor_falls_back_to_the_search_on_its_denser_side(tiny_moe_text):
    uniform = tiny_moe_text[3]
    prov, rows, calls = _optimize(tiny_moe_text, 0.2, max_evals=20)  # far too sparse for a 0.99 target; the
    # anchor may take (20 − 1) // 2 = 9 evaluations
    assert prov["anchor_from"] == "store" and prov["anchor_store"]["passed"] is False
    assert prov["anchor_search"][0]["p"] == 0.2 and not prov["anchor_search"][0]["passed"]
    assert len(prov["anchor_search"]) > 1 and all(r["p"] > 0.2 for r in prov["anchor_search"][1:])
    p = prov["anchor_p"]
    assert abs(p - uniform.critical_p) <= 0.0101  # both the passing end of a ≤ 0.005 bracket of the crossing
    assert splits_ratio(tiny_moe_text, p) >= 0.99 - 1e-12
    assert prov["evaluations"] == len(calls) == 1 + len(prov["anchor_search"]) + len(prov["search"]) <= 20


def splits_ratio(tiny_moe_text, p) -> float:
    _, splits, _, uniform = tiny_moe_text
    return splits.calibration(torch.full((4, 16), p, dtype=torch.float64)).score / uniform.dense_score


# -------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import save_tiny_moe_and_text

    root = tmp_path_factory.mktemp("sched_from")
    return (*save_tiny_moe_and_text(root), root)


def _run(capsys, *argv):
    from moeprof.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


SMALL = ("--seq-len", 32, "--max-tokens", 256, "--batch-size", 4)


def test_schedule_from_a_critical_store_starts_from_its_anchor_and_stores_the_schedule(setup, capsys):
    from moeprof.schedule import Schedule
    from moeprof.store import open_store

    ckpt, data, root = setup
    store = root / "moe.h5"
    assert _run(capsys, "profile", ckpt, "--data", data, "--out", store, *SMALL[:4])[0] == 0
    code, _, err = _run(capsys, "critical", ckpt, "--type", "i", "--task", f"ppl:{data}", "--out", store, *SMALL)
    assert code == 0, err
    with open_store(store) as st:
        p_star = float(st.critical(type="i", rule="topp", task=f"ppl:{data}").attrs["critical_p"])
    assert 0 < p_star < 1
    out = root / "s.json"
    code, text, err = _run(capsys, "schedule", ckpt, "--task", f"ppl:{data}", "--from", store, "--out", out, *SMALL,
                           "--max-evals", 6, "--min-tokens", 4)
    assert code == 0, err
    s = Schedule.load(out)
    prov = s.provenance
    assert prov["anchor_from"] == "store" and prov["anchor_search"][0]["p"] == p_star
    assert prov["anchor_store"]["store"] == str(store) and prov["anchor_store"]["critical_p"] == p_star
    assert prov["anchor_store"]["search_data"].endswith("its first 256 tokens")
    assert f"anchor = its uniform critical p {p_star:.4f}" in text and "expert curves are measured" in text
    passed = prov["anchor_store"]["passed"]
    assert (len(prov["anchor_search"]) == 1) == passed  # one evaluation exactly when it passed
    assert prov["evaluations"] == 1 + len(prov["anchor_search"]) + len(prov["search"]) <= 6
    with open_store(store) as st:
        assert st.schedule("s") == s
    # the store holds no record of type u: one line says so, the anchor is searched, the schedule still stored
    code, text, err = _run(capsys, "schedule", ckpt, "--type", "u", "--task", f"ppl:{data}", "--from", store,
                           "--out", root / "u.json", *SMALL, "--max-evals", 6, "--min-tokens", 4)
    assert code == 0, err
    assert f"its /critical records (i/topp/ppl:{data}) are not of type u" in text
    u = Schedule.load(root / "u.json")
    assert u.provenance["anchor_from"] == "search" and u.provenance["anchor_store"] is None
    with open_store(store) as st:
        assert st.schedule("u") == u


def test_schedule_from_a_store_of_another_shape_is_one_line_and_exit_2(setup, capsys, tmp_path):
    from test_report import MOE_PLAN, build_store

    ckpt, data, _ = setup
    other = build_store(tmp_path / "other.h5", MOE_PLAN, model="m", num_experts=6)  # [2, 6]; the model is [2, 7]
    code, _, err = _run(capsys, "schedule", ckpt, "--task", f"ppl:{data}", "--from", other, "--out",
                        tmp_path / "s.json")
    assert code == 2 and "(2, 6)" in err and "(2, 7)" in err and "give this model's store" in err
    assert not (tmp_path / "s.json").exists()


def test_schedule_from_another_models_store_is_refused_before_optimizing(qwen2_moe, tiny_checkpoint, tmp_path,
                                                                          capsys):
    folder, data, _ = qwen2_moe
    dense = tmp_path / "dense.h5"
    assert main(["profile", str(tiny_checkpoint), "--data", str(data), "--out", str(dense), "--seq-len", "16",
                 "--max-tokens", "16", "--types", "i"]) == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(SHARED_EXPERT_TEXT)
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--from", str(dense), "--out",
                 str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert code == 2 and "[layers, experts] = (2, 1)" in captured.err, captured.err
    assert "evaluation" not in captured.out and not (tmp_path / "s.json").exists()


def test_schedule_progress_counts_from_the_dense_evaluation_against_one_budget(tiny_moe_text):
    uniform = tiny_moe_text[3]
    start = round(min(uniform.critical_p + 0.02, 0.99), 4)
    prov, rows, calls = _optimize(tiny_moe_text, start, max_evals=8)
    assert rows[0]["label"] == "dense" and rows[0]["passed"] is None and rows[0]["ratio"] == 1.0
    assert [r["evaluation"] for r in rows] == list(range(1, len(rows) + 1))  # numbered from the dense one, no gap
    assert {r["max_evaluations"] for r in rows} == {8}  # one budget label for the whole run
    assert len(rows) == prov["evaluations"] == len(calls)  # one line per calibration evaluation


def test_a_schedule_name_the_store_cannot_hold_is_refused_before_optimizing(tmp_path, capsys):
    from conftest import refused

    refused(capsys, "schedule", "tiny-moe", "--task", "ppl:wikipedia", "--from", tmp_path / "p.h5", "--name", "a/b",
            "--out", tmp_path / "s.json", match="schedule name 'a/b' is not usable")
    assert not (tmp_path / "s.json").exists()
