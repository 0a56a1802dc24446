"""The critical package's API: token capture through `capture.attach`, the store record, the CLI flag, imports."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_qwen3_moe

ROOT = Path(__file__).resolve().parents[1]


def test_routed_tokens_observer_keeps_each_experts_own_rows_and_router_weights_through_attach():
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, attach
    from moeprof.critical import RoutedTokens

    model = tiny_qwen3_moe()
    sites = adapter_for(model).sites(model)
    seen = {}  # layer -> (hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) given to the experts

    def spy(site):
        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args):]]
            seen[site.layer] = tuple(v.detach().clone() for v in vals[:3])
        return hook

    handles = [s.experts.register_forward_pre_hook(spy(s), with_kwargs=True) for s in sites]
    routed = RoutedTokens(max_tokens_per_expert=5)
    try:
        with torch.no_grad(), attach(model, Engine(sites, observers=[routed])):
            model(input_ids=torch.randint(0, 64, (2, 8)))
    finally:
        for h in handles:
            h.remove()
    for layer, (hidden, idx, weights) in seen.items():
        for e in range(4):
            tok, slot = (idx == e).nonzero(as_tuple=True)  # rows routed to e, in token order
            x, w = routed.tokens(layer, e)
            if tok.numel() == 0:
                assert x is None and w is None
                continue
            n = min(5, tok.numel())  # capped at max_tokens_per_expert
            assert torch.equal(x, hidden[tok[:n]].float())
            assert torch.equal(w, weights[tok[:n], slot[:n]].float())
    assert not any(getattr(s.experts, "_moeprof_engine", None) for s in sites)  # restored on exit


def test_routed_tokens_of_a_dense_model_have_router_weight_one():
    from conftest import tiny_qwen3_model, tiny_tokenizer
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, attach
    from moeprof.critical import RoutedTokens

    tok = tiny_tokenizer()
    model = tiny_qwen3_model(tok)
    sites = adapter_for(model).sites(model)
    routed = RoutedTokens(max_tokens_per_expert=100)
    ids = torch.randint(0, len(tok), (2, 6))
    with torch.no_grad(), attach(model, Engine(sites, observers=[routed])):
        model(input_ids=ids)
    x, w = routed.tokens(0, 0)
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
    assert x.shape == (12, embedded.shape[-1]) and torch.equal(w, torch.ones(12))
    assert routed.tokens(0, 1) == (None, None)


def test_critical_record_round_trips_through_the_store(tmp_path):
    from conftest import tiny_qwen3_model, tiny_tokenizer
    from moeprof.critical import CriticalRun, EvalPoint, ExpertTolerance, critical_record, find_critical, write
    from moeprof.profile import profile
    from moeprof.store import open_store

    tok = tiny_tokenizer()
    model = tiny_qwen3_model(tok)
    text = tmp_path / "t.txt"
    text.write_text("experts route tokens to a few gated blocks. " * 40)
    store = tmp_path / "s.h5"
    profile(model, tok, [str(text)], store, model_id="tiny", max_tokens=64, seq_len=16)
    with open_store(store) as st:
        L, E = st.num_layers, st.num_experts
    per = np.full((L, E), 0.4)
    res = find_critical(lambda p: EvalPoint(p=p, score=1.0 if p is None else 1 - 0.05 * (1 - p),
                                            sparsity_token=0.0 if p is None else 1 - p,
                                            per_expert_sparsity=None if p is None else per), type="i", task="t")
    grid = np.array([0.5, 0.9])
    tol = ExpertTolerance(grid, np.full((L, E, 2), 0.01), np.full((L, E, 2), 0.3), np.ones((L, E), np.int64),
                          budget=0.05, type="i", rule="topp")
    write(store, CriticalRun(res, tol))
    mine = critical_record(res, tol)
    with open_store(store) as st:
        back = st.critical()
    assert back.attrs["critical_p"] == res.critical_p and back.attrs["tolerance_budget"] == 0.05
    assert back.attrs["monotone"] is True and math.isnan(back.attrs["failing_p"]) == (res.failing_p is None)
    assert set(back.arrays()) == set(mine.arrays())
    for name, arr in mine.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], arr)


def test_report_prints_the_search_from_a_record_without_torch():
    code = ("import sys, numpy as np; from moeprof.report.critical_tables import search_headline, search_points_table; "
            "from moeprof.store import Critical; "
            "a = dict(task='t', type='i', rule='topp', target=0.99, dense_score=2.0, critical_p=0.8, "
            "critical_sparsity_token=0.5, critical_sparsity_flop=0.4, critical_score=1.99, critical_ratio=0.995, "
            "ratio_ci_low=float('nan'), ratio_ci_high=float('nan'), ci_level=0.95, monotone=False, "
            "at_bound=False, num_evaluations=3); "
            "r = Critical(a, points=dict(p=np.array([0.9, 0.8]), score=np.array([2.0, 1.99]), "
            "ratio=np.array([1.0, 0.995]), sparsity_token=np.array([0.4, 0.5]), "
            "sparsity_flop=np.array([0.3, 0.4]), passed=np.array([True, True]))); "
            "print(search_headline(r)); print(search_points_table(r).row_count); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True).stdout.splitlines()
    assert out[0].startswith("critical p = 0.8000 → sparsity 0.500") and "not monotone" in out[0]
    assert "CI" not in out[0]
    assert out[1:] == ["3", "False"]  # dense row + 2 points; the report layer never imports torch


def test_importing_the_critical_package_loads_neither_transformers_nor_h5py():
    code = ("import sys, moeprof.critical; "
            "print([m for m in ('transformers', 'h5py', 'lm_eval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True).stdout.strip()
    assert out == "[]"


def test_critical_cli_has_no_check_flag_and_keeps_its_defaults():
    from moeprof.cli import build_parser

    args = build_parser().parse_args(["critical", "m", "--task", "ppl:wikipedia", "--no-check"])
    assert args.no_check is True
    args = build_parser().parse_args(["critical", "m", "--task", "ppl:wikipedia"])
    assert (args.no_check, args.seq_len, args.max_tokens, args.type, args.target) == (False, 256, 8192, "i", 0.99)


def test_unknown_ppl_file_is_a_usage_error_naming_the_corpora(tmp_path):
    from moeprof.evaluate.task import resolve_task
    from moeprof.errors import UsageError

    with pytest.raises(UsageError, match="ppl:wikipedia"):
        resolve_task(f"ppl:{tmp_path / 'none.txt'}")
    assert resolve_task("ppl:wikipedia").is_perplexity and not resolve_task("arc_easy").is_perplexity
