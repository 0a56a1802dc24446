"""Real-model check: SmolLM2-135M's critical sparsity of i and x, on held-out perplexity and on ARC-Easy."""

import warnings

import numpy as np
import pytest

from moeprof.critical import critical_sparsity

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def ppl_results(smollm2):
    model, tok = smollm2
    return {t: critical_sparsity(model, tok, type=t, task="ppl:wikipedia", max_tokens=1024, seq_len=256,
                                 batch_size=4) for t in ("i", "x")}


def test_smollm2_perplexity_critical_sparsity_orders_intermediate_above_input(ppl_results):
    i, x = ppl_results["i"], ppl_results["x"]
    for r in (i, x):
        assert r.critical_ratio >= 0.99 and r.num_evaluations <= 10
        assert 0.0 < r.critical_p < 1.0 and r.failing_p is not None and r.failing_p < r.critical_p
        assert r.critical_p - r.failing_p <= 0.005 + 1e-9  # found to ±0.005 in p
        lo, hi = r.ratio_ci
        assert lo <= r.critical_ratio <= hi
    # the paper's ordering: the intermediate activation tolerates more sparsity than the FFN input
    assert i.critical_sparsity_token > x.critical_sparsity_token > 0.0
    assert i.critical_sparsity_token == pytest.approx(i.critical_sparsity_flop)  # dense: one FFN size


def test_smollm2_arc_easy_critical_search_runs_on_stock_lm_eval_scores(smollm2):
    model, tok = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 20 documents: the coarse-score warning is expected
        r = critical_sparsity(model, tok, type="i", task="arc_easy", limit=20, batch_size=8)
    assert 0.0 < r.dense_score <= 1.0
    assert r.critical_ratio >= 0.99 and 1 <= r.num_evaluations <= 12
    assert np.isfinite(r.critical_sparsity_token) or r.critical_p == 1.0
