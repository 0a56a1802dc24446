"""The evaluation journal of a search: what it reuses (only the same key and p), what it keeps (other searches'
entries), how it reads back (bit for bit) and how a damaged journal is refused."""

import math

import numpy as np
import pytest

from moeprof.evaluate.journal import EvaluationJournal, JournalError, journal_path, point_id
from moeprof.evaluate.point import EvalPoint

KEY = {"search": "critical", "model": "m", "task": "ppl:wikipedia", "type": "i", "rule": "topp", "max_tokens": 512}


def _point(p):
    per = np.array([[0.25, np.nan], [1 / 3, 0.1 + 0.2]], dtype=np.float32)
    scalar = p if isinstance(p, float) else 1.0  # (None: dense; an array: a schedule's table)
    return EvalPoint(p=p if isinstance(p, float) else None, score=math.pi * scalar, sparsity_token=0.1 + 0.2, sparsity_flop=float("nan"),
                     score_kind="inv_ppl", example_values=np.array([1 / 3, 2 / 7]), example_weights=np.array([3, 7]),
                     per_expert_sparsity=per, extra={"seconds": 1.5})


def _calls():
    made = []

    def evaluate(p):
        made.append(p)
        return _point(p)

    return made, evaluate


def test_a_journaled_evaluation_reads_back_bit_for_bit_and_is_not_run_again(tmp_path):
    path = journal_path(tmp_path / "out.h5")
    assert path.name == "out.h5.journal"
    made, evaluate = _calls()
    first = EvaluationJournal(path, KEY).wrap(evaluate)
    a = first(0.9)
    first(None)
    again = EvaluationJournal(path, KEY)
    assert len(again) == 2
    b = again.wrap(evaluate)(0.9)
    assert made == [0.9, None] and again.reused == 1
    for name in ("p", "score", "sparsity_token", "score_kind", "extra"):
        assert getattr(a, name) == getattr(b, name)
    assert math.isnan(b.sparsity_flop)
    for name in ("example_values", "example_weights", "per_expert_sparsity"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_only_the_same_key_and_p_are_reused(tmp_path):
    path = tmp_path / "out.h5.journal"
    made, evaluate = _calls()
    EvaluationJournal(path, KEY).wrap(evaluate)(0.9)
    EvaluationJournal(path, {**KEY, "max_tokens": 1024}).wrap(evaluate)(0.9)  # other data: evaluated again
    EvaluationJournal(path, KEY).wrap(evaluate)(0.8999)  # another p
    EvaluationJournal(path, KEY).wrap(evaluate, "heldout")(0.9)  # another split of the same search
    assert made == [0.9, 0.9, 0.8999, 0.9]


def test_a_schedule_table_is_journaled_by_its_values(tmp_path):
    table = np.array([[0.9, np.nan], [0.8, 0.7]])
    assert point_id(table) == point_id(table.copy()) != point_id(table + 1e-12)
    made, evaluate = _calls()
    evaluate = EvaluationJournal(tmp_path / "s.json.journal", KEY).wrap(evaluate)
    evaluate(table)
    evaluate(table.copy())
    assert len(made) == 1


def test_discard_removes_this_search_and_keeps_the_others(tmp_path):
    path = tmp_path / "out.h5.journal"
    _, evaluate = _calls()
    EvaluationJournal(path, {**KEY, "type": "x"}).wrap(evaluate)(0.5)
    mine = EvaluationJournal(path, KEY)
    mine.wrap(evaluate)(0.7)
    mine.discard()
    assert len(EvaluationJournal(path, KEY)) == 0 and len(EvaluationJournal(path, {**KEY, "type": "x"})) == 1
    EvaluationJournal(path, {**KEY, "type": "x"}).discard()
    assert not path.exists()


def test_a_damaged_journal_is_refused_naming_it(tmp_path):
    path = tmp_path / "out.h5.journal"
    path.write_text('{"format": "moeprof evaluation journal", "entries": [{"key": ')
    with pytest.raises(JournalError, match=f"{path} is not a readable moeprof evaluation journal"):
        EvaluationJournal(path, KEY)
