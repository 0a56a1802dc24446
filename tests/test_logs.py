"""What long jobs say and what they keep: progress as plain log lines off a terminal, one line per critical
evaluation (checked against the store's points), warnings (less data than --max-tokens, the search's own) shown
once and kept in /critical with --limit / --max-tokens, the leaderboard caption beside p*, a degenerate CI
explained, and --help on every flag."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_moe_and_text, tiny_tokenizer
from rich.console import Console

from moeprof.cli import build_parser, main
from moeprof.critical import EvalPoint, find_critical
from moeprof.critical.pipeline import critical_record
from moeprof.critical.search import max_evaluations
from moeprof.profile import LoggedProgress, progress_bar
from moeprof.report.critical_tables import ci_text, critical_headline, evaluation_line
from moeprof.store import Critical, open_store

TEXT = ("Routers send each token to a few experts. Each expert is a small gated feed-forward block, and most "
        "of its activations are tiny compared with a handful of large ones. ")
SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    tok = tiny_tokenizer()
    ckpt, data = save_tiny_moe_and_text(root, text=TEXT, docs=5)
    held = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in data.read_text().splitlines())
    return ckpt, data, root, held // SEQ * SEQ  # the tokens the data packs into


def run(capsys, *argv):  # (--threads 1 where a model runs: 2 threads on a busy 2-core box are ~100x slower)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def critical_run(setup, tmp_path_factory):
    """`moeprof critical` with --max-tokens far beyond the data, its stdout captured (not a terminal)."""
    ckpt, data, root, _ = setup
    store = root / "moe.h5"
    mp = pytest.MonkeyPatch()
    out = io.StringIO()
    mp.setattr("sys.stdout", out)
    try:
        assert main(["--threads", "1", "profile", str(ckpt), "--data", str(data), "--out", str(store), "--seq-len", str(SEQ),
                     "--max-tokens", "128"]) == 0
        out.seek(0), out.truncate()
        code = main(["--threads", "1", "critical", str(ckpt), "--type", "i", "--task", f"ppl:{data}", "--out", str(store),
                     "--seq-len", str(SEQ), "--max-tokens", "100000", "--batch-size", "8"])
    finally:
        mp.undo()
    assert code == 0, out.getvalue()
    return store, out.getvalue()


EVAL_LINE = re.compile(r"^evaluation (\d+)/≤(\d+)  (?:dense|p ([0-9.]+))  (?:score|ppl \S+ \(score 1/ppl|accuracy) ([^\s)]+)\)?  ratio ([0-9.]+)"
                       r"(?: (pass|fail))?(?:  sparsity ([0-9.]+) tok / ([0-9.]+) FLOP)?  elapsed ([0-9.]+) s$")


def test_critical_prints_one_line_per_evaluation_that_matches_the_stored_points(critical_run):
    store, out = critical_run
    lines = [EVAL_LINE.match(line) for line in out.splitlines() if line.startswith("evaluation ")]
    assert lines and all(lines), out
    with open_store(store) as st:
        rec = st.critical()
    a, pts = rec.attrs, rec.points
    assert len(lines) == a["num_evaluations"] == len(pts["p"]) + 1  # dense + every sparse point
    assert [int(m[1]) for m in lines] == list(range(1, len(lines) + 1))
    bound = max_evaluations(check=False, extend=True)  # the CLI default: no monotonicity check
    assert {int(m[2]) for m in lines} == {bound} and len(lines) <= bound
    dense, sparse = lines[0], lines[1:]
    assert dense[3] is None and dense[6] is None and float(dense[5]) == 1.0
    assert float(dense[4]) == pytest.approx(a["dense_score"], rel=1e-4)
    for m, p, score, ratio, s_tok, s_flop, ok in zip(sparse, pts["p"], pts["score"], pts["ratio"],
                                                     pts["sparsity_token"], pts["sparsity_flop"], pts["passed"]):
        assert float(m[3]) == pytest.approx(p, abs=5e-5)
        assert float(m[4]) == pytest.approx(score, rel=1e-4)
        assert float(m[5]) == pytest.approx(score / a["dense_score"], abs=5e-5) == pytest.approx(ratio, abs=5e-5)
        assert float(m[7]) == pytest.approx(s_tok, abs=5e-4) and float(m[8]) == pytest.approx(s_flop, abs=5e-4)
        assert m[6] == ("pass" if ok else "fail")
    elapsed = [float(m[9]) for m in lines]
    assert elapsed == sorted(elapsed)
    assert "measuring each expert's own tolerance" in out and "tolerance measured on" in out


def test_max_tokens_beyond_the_data_warns_once_and_the_record_keeps_it_with_the_settings(setup, critical_run):
    _, data, _, held = setup
    store, out = critical_run
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1, out  # once: not again for the tolerance stage, which takes at most 8,192 by design
    assert f"--max-tokens 100,000 asks for more than {data} holds: it packs into only {held:,} tokens" in warned[0]
    with open_store(store) as st:
        a = st.critical().attrs
    assert a["max_tokens"] == 100_000 and a["seq_len"] == SEQ and "limit" not in a
    assert a["tokens"] == held and a["examples"] == held // SEQ
    assert a["warnings"].splitlines() == [warned[0][len("warning: "):]]


def test_leaderboard_caption_shows_the_settings_and_warnings_beside_p_star(critical_run, capsys):
    store, _ = critical_run
    code, out, err = run(capsys, "leaderboard", store, "--type", "i")
    assert code == 0, err
    with open_store(store) as st:
        a = st.critical().attrs
    flat = " ".join(out.split())
    p_star = f"p* = {a['critical_p']:g}; on {a['examples']} sequences, {a['tokens']:,} tokens (--max-tokens 100,000, "
    assert p_star in flat, flat
    assert "⚠ 1 warning: --max-tokens 100,000 asks for more than" in flat


def test_profile_warns_when_max_tokens_asks_for_more_than_the_data_holds(setup, tmp_path, capsys):
    ckpt, data, _, held = setup
    code, out, err = run(capsys, "--threads", 1, "profile", ckpt, "--data", data, "--out", tmp_path / "p.h5", "--seq-len", SEQ,
                         "--max-tokens", 100_000, "--batch-size", 8)
    assert code == 0, err
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: --max-tokens 100,000 asks for more than {data} holds: it packs into only "
                      f"{held:,} tokens ({held // SEQ} sequences of {SEQ}); using those (give more data, or a "
                      "--max-tokens within it)"]
    with open_store(tmp_path / "p.h5") as st:
        assert st.attrs["tokens"] == held
    # within the data: no warning
    code, out, _ = run(capsys, "--threads", 1, "profile", ckpt, "--data", data, "--out", tmp_path / "q.h5", "--seq-len", SEQ,
                       "--max-tokens", held)
    assert code == 0 and "warning" not in out


def test_profile_off_a_terminal_logs_progress_lines_with_eta(setup, tmp_path, capsys):
    ckpt, data, _, held = setup
    budget = held // (2 * SEQ) * (2 * SEQ)  # whole batches of 2 sequences: one bar update per 2·SEQ tokens
    code, out, err = run(capsys, "--threads", 1, "profile", ckpt, "--data", data, "--out", tmp_path / "p.h5", "--seq-len", SEQ,
                         "--max-tokens", budget, "--batch-size", 2)
    assert code == 0, err
    lines = re.findall(r"^profiling \S+: ([\d,]+)/([\d,]+) tok \((\d+)%\)(.*)$", out, re.M)
    done = [int(d.replace(",", "")) for d, *_ in lines]
    assert {int(t.replace(",", "")) for _, t, _, _ in lines} == {budget}
    assert done == sorted(set(done)) and done[-1] == budget
    steps = budget // (2 * SEQ)
    assert 8 <= len(lines) <= min(steps, 11)  # about one per 10%, not one per batch, nor one at the end only
    assert all(", ETA " in rest for *_, rest in lines[:-1]) and "ETA" not in lines[-1][3]
    assert all("elapsed" in rest for *_, rest in lines)


def test_logged_progress_prints_one_line_per_tenth_or_per_period_and_stays_a_bar_in_a_terminal():
    def drive(console, **kw):
        with LoggedProgress(console=console, **kw) as bar:
            t = bar.add_task("work", total=1000)
            for n in range(50, 1001, 50):
                bar.update(t, completed=n)

    buf = io.StringIO()
    drive(Console(file=buf, force_terminal=False, width=200))
    done = [int(m.replace(",", "")) for m in re.findall(r"^work: ([\d,]+)/1,000 tok", buf.getvalue(), re.M)]
    assert done == list(range(100, 1001, 100))
    buf = io.StringIO()
    drive(Console(file=buf, force_terminal=False, width=200), log_every_frac=1.0, log_every_s=0.0)
    assert len(buf.getvalue().splitlines()) == 20  # the period alone: a line at every update
    buf = io.StringIO()
    drive(Console(file=buf, force_terminal=True, width=200))
    assert not re.search(r"^work: ", buf.getvalue(), re.M)  # a terminal gets the live bar, not log lines
    assert any(type(c).__name__ == "TimeRemainingColumn" for c in progress_bar().columns)


# ----------------------------------------------------------------------------------------------------------
# The search's warnings, kept; the headline


class Curve:
    def __init__(self, f, dense=1.0, examples=None):
        self.f, self.dense, self.examples = f, dense, examples

    def __call__(self, p):
        score = self.dense if p is None else float(self.f(p))
        ex = None if self.examples is None else np.full(self.examples, score)
        return EvalPoint(p=p, score=score, sparsity_token=0.0 if p is None else 1 - p,
                         sparsity_flop=0.0 if p is None else 1 - p, example_values=ex,
                         example_weights=None if ex is None else np.ones(self.examples))


def test_search_keeps_its_warnings_in_the_result_and_the_record():
    bumpy = Curve(lambda p: 0.98 if 0.6 < p < 0.8 else 1.0)  # fails at 0.7, passes again at 0.5
    with pytest.warns(UserWarning):
        res = find_critical(bumpy, chance=1.0, extend=False, check=True)
    assert not res.monotone
    kinds = [("chance level" in w, "not monotone" in w) for w in res.warnings]
    assert kinds == [(True, False), (False, True)]
    record = critical_record(res)
    assert record.attrs["warnings"].split("\n") == res.warnings
    line = critical_headline(record)
    assert "p* = " in line and "⚠ 2 warnings: the dense score 1.0000 is at chance level" in line
    assert "p=0.5 passes below the failing p=0.7" in line
    smooth = find_critical(Curve(lambda p: 1 - 0.1 * (1 - p)))
    assert smooth.warnings == [] and "⚠" not in critical_headline(critical_record(smooth))
    with pytest.warns(UserWarning, match="one example"):
        coarse = find_critical(Curve(lambda p: 1 - 0.1 * (1 - p), examples=20))  # one example = 5% > 1%
    assert any("one example moves the score ratio by 5.0%" in w for w in coarse.warnings)


def test_max_evaluations_bounds_every_search():
    rng = np.random.default_rng(0)
    for extend in (False, True):
        for check in (False, True):
            bound = max_evaluations(check=check, extend=extend)
            for c in rng.uniform(0.02, 0.99, 60):
                for f in (lambda p, c=c: 1.0 if p >= c else 0.5, lambda p, c=c: 1 - 0.01 * (1 - p) / (1 - c)):
                    res = find_critical(Curve(f), check=check, extend=extend)
                    assert res.num_evaluations <= bound


def _record(**attrs):
    base = dict(task="t", type="i", rule="topp", target=0.99, dense_score=2.0, critical_p=0.8,
                critical_sparsity_token=0.5, critical_sparsity_flop=0.4, critical_score=1.99, critical_ratio=0.995,
                ci_level=0.95, monotone=True, at_bound=False, num_evaluations=5)
    return Critical({**base, **attrs})


def test_a_degenerate_ci_is_explained_not_printed_as_a_bracket():
    line = critical_headline(_record(ratio_ci_low=1.0, ratio_ci_high=1.0), detail=True)
    assert "[1.0000, 1.0000]" not in line and "all examples equal" in line and "ratio is 1.0000" in line
    line = critical_headline(_record(ratio_ci_low=0.981, ratio_ci_high=0.9934), detail=True)
    assert "95% CI [0.9810, 0.9934]" in line
    assert ci_text(math.nan, math.nan) == ""
    from moeprof.cli.schedule import _ci  # `moeprof schedule` / `eval` tables

    assert _ci((1.0, 1.0)) == "degenerate (all examples equal)" and _ci((0.981, 0.9934)) == "[0.9810, 0.9934]"


def test_an_older_record_without_the_new_attributes_still_reads():
    line = critical_headline(_record())
    assert line.startswith("critical for t (topp on i, score ≥ 99% of dense): p* = 0.8, sparsity 0.500")
    assert "⚠" not in line and "--limit" not in line
    detail = critical_headline(_record(), detail=True)
    assert "CI" not in detail and "warning" not in detail
    assert "--limit 100" in critical_headline(_record(limit=100, examples=100))


def test_evaluation_line_reads_k_of_n_p_score_ratio_sparsity_and_elapsed():
    line = evaluation_line(3, 12, "p 0.7000", score=0.0123456, ratio=0.98765, passed=False, sparsity_token=0.5123,
                           sparsity_flop=0.4981, elapsed_s=12.34)
    assert line == ("evaluation 3/≤12  p 0.7000  score 0.012346  ratio 0.9877 fail  sparsity 0.512 tok / 0.498 FLOP  "
                    "elapsed 12.3 s")


# ----------------------------------------------------------------------------------------------------------
# --help and --threads


def _actions(parser, path=("moeprof",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        else:
            yield path, action


def test_every_flag_and_argument_of_every_subcommand_has_help():
    actions = list(_actions(build_parser()))
    assert len({p for p, _ in actions}) >= 14  # every subcommand was walked
    missing = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in actions
               if not a.help or a.help == argparse.SUPPRESS or not a.help.strip()]
    assert missing == []


def test_by_explains_spread_and_critical_task_lists_the_corpora_and_tasks():
    from moeprof import corpora
    from moeprof.evaluate.tasks import task_names

    helps = {(p[-1], a.dest): a.help for p, a in _actions(build_parser())}
    assert "spread: by the std of the per-token sparsity" in helps[("leaderboard", "by")]
    for command in ("critical", "schedule", "eval"):
        text = helps[(command, "task")]
        assert all(f"ppl:{name}" in text for name in corpora.NAMES) and "ppl:FILE" in text
        assert all(name in text for name in task_names()), command


def test_threads_caps_torch_for_the_command_and_restores_it(monkeypatch, tmp_path):
    import moeprof.cli.reports as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["--threads", "1", "info", str(tmp_path / "any.h5")]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        main(["--threads", "0", "info", "x.h5"])
    seen.clear()
    assert main(["info", str(tmp_path / "any.h5"), "--threads", "1"]) == 0  # after the command too (`demo --threads`)
    assert seen == [1] and torch.get_num_threads() == before
    parse = build_parser().parse_args
    assert parse(["demo", "--threads", "2"]).threads == 2 and parse(["--threads", "3", "demo"]).threads == 3
    assert parse(["demo"]).threads is None


def test_evaluation_line_reads_perplexity_for_a_perplexity_task_and_accuracy_for_lm_eval():
    ppl = evaluation_line(2, 12, "p 0.7000", score=1 / 160, ratio=150 / 160, passed=False, sparsity_token=0.5,
                          sparsity_flop=0.5, elapsed_s=1.0, kind="inv_ppl")
    assert "  ppl 160 (score 1/ppl 0.00625)  ratio 0.9375 fail" in ppl and EVAL_LINE.match(ppl)
    acc = evaluation_line(2, 12, "p 0.7000", score=0.41, ratio=0.41 / 0.43, passed=False, sparsity_token=0.5,
                          sparsity_flop=0.5, elapsed_s=1.0, kind="mean")
    assert "  accuracy 0.4100  ratio 0.9535 fail" in acc and EVAL_LINE.match(acc)


def _points_record(task, dense, scores, kind=None):
    from moeprof.store import Critical

    scores = np.asarray(scores, float)
    attrs = dict(task=task, type="i", rule="topp", target=0.99, dense_score=dense, critical_p=0.8,
                 critical_sparsity_token=0.5, critical_sparsity_flop=0.4, critical_score=scores[0],
                 critical_ratio=scores[0] / dense, ci_level=0.95, monotone=True, at_bound=False, num_evaluations=3)
    if kind:
        attrs["score_kind"] = kind
    points = {"p": np.array([0.8, 0.6]), "score": scores, "ratio": scores / dense, "passed": scores / dense >= 0.99,
              "sparsity_token": np.array([0.5, 0.7]), "sparsity_flop": np.array([0.4, 0.6])}
    return Critical(attrs, points=points)


def _columns(table):
    return {c.header: list(c._cells) for c in table.columns}


def test_critical_table_prints_perplexity_and_its_ratio_to_dense_for_a_perplexity_task():
    from moeprof.report.critical_tables import search_points_table

    # dense ppl 150; sparse ppl 151 and 170 (by hand: 151/150 = 1.0067, 170/150 = 1.1333; scores 1/ppl)
    rec = _points_record("ppl:wikipedia", 1 / 150, [1 / 151, 1 / 170])
    cols = _columns(search_points_table(rec))
    assert cols["perplexity"] == ["150", "151", "170"]
    assert cols["ppl ÷ dense"] == ["1.0000", "1.0067", "1.1333"]
    assert cols["score ratio (dense ppl ÷ ppl)"] == ["1.0000", "0.9934", "0.8824"]  # 150/151, 150/170
    assert "score" not in cols and "accuracy" not in cols
    head = critical_headline(rec, detail=True)
    assert "perplexity 151 vs dense 150 (1.0067× dense" in head and "score ratio dense ppl ÷ ppl 0.9934" in head
    assert "(dense perplexity 150)" in critical_headline(rec)


def test_critical_table_prints_accuracy_for_an_lm_eval_task():
    from moeprof.report.critical_tables import search_points_table

    rec = _points_record("arc_easy", 0.5, [0.495, 0.40], kind="mean")
    cols = _columns(search_points_table(rec))
    assert cols["accuracy"] == ["0.5000", "0.4950", "0.4000"] and cols["ratio"] == ["1.0000", "0.9900", "0.8000"]
    assert "perplexity" not in cols
    assert "accuracy 0.4950 vs dense 0.5000 (ratio 0.9900" in critical_headline(rec, detail=True)


def test_schedule_search_numbers_its_evaluations_within_a_bound():
    from moeprof.optimize import ExpertCurves, search_schedule

    rng = np.random.default_rng(1)
    grid = np.linspace(0.2, 0.975, 8)
    L, E = 2, 3
    curves = ExpertCurves(grid, rng.uniform(0.5, 1.5, (L, E, 1)) * (1 - grid) ** 2, np.broadcast_to(1 - grid, (L, E, 8)),
                          np.full((L, E), 100), np.ones(L), np.full(L, E))

    def evaluate(table):
        if table is None:
            return EvalPoint(p=None, score=1.0, sparsity_token=0.0, sparsity_flop=0.0)
        kept = torch.nan_to_num(table, nan=1.0)
        s = float((1 - kept).mean())
        return EvalPoint(p=None, score=1.0 - 0.05 * s ** 2, sparsity_token=s, sparsity_flop=s, sparsity_flop_overall=s)

    rows = []
    found = search_schedule(evaluate, curves, target=0.99, on_eval=rows.append)
    assert [r["evaluation"] for r in rows] == list(range(2, len(rows) + 2))  # dense is evaluation 1
    assert len({r["max_evaluations"] for r in rows}) == 1 and found.num_evaluations <= rows[0]["max_evaluations"]
    line = evaluation_line(rows[-1]["evaluation"], rows[-1]["max_evaluations"], f"λ {rows[-1]['lam']:.4g}",
                           score=rows[-1]["score"], ratio=rows[-1]["ratio"], passed=rows[-1]["passed"],
                           sparsity_token=rows[-1]["sparsity_token"], sparsity_flop=rows[-1]["sparsity_flop"],
                           elapsed_s=1.0)
    assert EVAL_LINE.match(line.replace(f"λ {rows[-1]['lam']:.4g}", f"p {0.5:.4f}"))


# ----------------------------------------------------------------------------------------------------------
# other libraries' progress bars


def test_library_tqdm_bars_are_dropped_and_their_warnings_shown_once():
    import contextlib
    import warnings

    from tqdm import tqdm  # what lm-eval and transformers' GGUF conversion draw with

    from moeprof.cli.quiet import BarFilter, is_bar_frame, quiet_library_bars

    real = io.StringIO()
    with contextlib.redirect_stderr(real), warnings.catch_warnings():
        # Python's own display (pytest records warnings instead): to sys.stderr as it is at the time
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        with quiet_library_bars() as filt:
            for _ in tqdm(range(7), desc="Running loglikelihood requests", mininterval=0):
                pass
            for _ in tqdm(iter(range(3)), desc="Converting and de-quantizing GGUF tensors...", mininterval=0):
                pass
            for _ in range(3):  # one warning per evaluation of a search
                warnings.warn("the tokenizer is slow", UserWarning)
            print("a plain line", file=sys.stderr)
        assert filt.dropped >= 4
        for _ in tqdm(range(2), desc="after"):  # stderr is itself again after the block
            pass
    lines = real.getvalue().split("\n")
    before = lines[:lines.index("a plain line") + 1]
    assert [l for l in before if l.strip()][-1] == "a plain line"
    warned = [l for l in before if "UserWarning: the tokenizer is slow" in l]
    assert len(warned) == 1 and not any("requests" in l or "GGUF" in l for l in before)
    assert "after: 100%|" in real.getvalue()
    # the frame test against tqdm's own formatter (known total, unknown total, seconds per item)
    assert is_bar_frame(tqdm.format_meter(9, 20, 1.7, prefix="x"))
    assert is_bar_frame(tqdm.format_meter(9, None, 1.7, prefix="x"))
    assert is_bar_frame(tqdm.format_meter(1, 20, 30.0))
    assert not is_bar_frame("evaluation 3/≤12  p 0.7000  accuracy 0.4100  ratio 0.9535 fail  elapsed 12.3 s")
    assert not is_bar_frame("warning: 45% of the data | used")
    assert BarFilter(io.StringIO()).write("x") == 1


def test_commands_that_load_models_quiet_library_bars():
    import inspect

    from moeprof.cli import app

    src = inspect.getsource(app.main)
    assert "quiet_library_bars()" in src and "quiet_hf" in src


def test_a_ratio_ci_too_wide_to_resolve_a_one_percent_loss_says_so():
    from moeprof.cli.schedule import _ci

    # 20 documents of a 4-choice task: the bootstrap ratio spans [0, 4]
    line = critical_headline(_record(ratio_ci_low=0.0, ratio_ci_high=4.0, examples=20), detail=True)
    assert "CI not resolvable with 20 examples" in line and "[0.0000, 4.0000]" not in line
    assert "[0.00, 4.00]" in line and "--limit" in line
    assert ci_text(0.9, 1.3) == "CI [0.9000, 1.3000]"  # 0.4 wide: still a bracket
    assert ci_text(0.7, 1.3).startswith("CI not resolvable (the bootstrap range [0.70, 1.30]")
    assert _ci((0.0, 4.0)).startswith("not resolvable (the bootstrap range [0.00, 4.00]")


def test_profile_progress_counts_whole_sequences_and_ends_at_100_percent(setup, tmp_path, capsys):
    ckpt, data, _, held = setup
    budget = held // (2 * SEQ) * (2 * SEQ) - SEQ // 2  # not a whole number of sequences
    whole = budget // SEQ * SEQ  # by hand: what packing into SEQ-token sequences can give
    code, out, err = run(capsys, "--threads", 1, "profile", ckpt, "--data", data, "--out", tmp_path / "p.h5",
                         "--seq-len", SEQ, "--max-tokens", budget, "--batch-size", 2)
    assert code == 0, err
    lines = re.findall(r"^profiling \S+: ([\d,]+)/([\d,]+) tok \((\d+)%\)", out, re.M)
    assert {int(t.replace(",", "")) for _, t, _ in lines} == {whole}
    assert int(lines[-1][0].replace(",", "")) == whole and lines[-1][2] == "100"
    with open_store(tmp_path / "p.h5") as st:
        assert st.attrs["tokens"] == whole
