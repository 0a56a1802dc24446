"""`moeprof leaderboard STORE --by token`: the sparsest and densest traced tokens per layer, checked by brute force
against topp_mask on the captured rows."""

import pytest
import torch

from moeprof.cli import main


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    data = tmp / "d.txt"
    data.write_text("The river ran past the old mill, where children played with paper boats. " * 8)
    out = tmp / "t.h5"
    assert main(["profile", "tiny-moe", "--data", str(data), "--seq-len", "32", "--batch-size", "1",
                 "--max-tokens", "64", "--types", "i", "--trace-tokens", "32", "--p-grid", "0.5,0.9",
                 "--out", str(out)]) == 0
    return out, data


def test_token_rows_are_the_brute_force_extremes_per_layer(traced):
    from moeprof.arch import adapter_for
    from moeprof.capture import Engine, attach
    from moeprof.models import load_model
    from moeprof.report.leaderboard import token_leaderboard_rows
    from moeprof.store import open_store
    from moeprof.topp import topp_mask

    out, data = traced
    model, tok = load_model("tiny-moe")
    ids = tok(data.read_text(), return_tensors="pt").input_ids[:, :32]  # the first packed sequence

    class Rows:
        type = "i"
        rows = {}

        def add(self, obs):
            if obs.type == "i":
                self.rows[obs.layer] = (obs.vectors.float(), obs.token_idx)

    rows = Rows()
    with attach(model, Engine(adapter_for(model).sites(model), observers=[rows])), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    with open_store(out) as st:
        got = token_leaderboard_rows(st, type="i", p=0.9, top=3)
        texts = st.token_texts()
    for layer, (v, tidx) in rows.rows.items():
        s = 1 - topp_mask(v, 0.9).sum(-1).double() / v.shape[-1]  # [T·K]
        per_token = torch.zeros(32, dtype=torch.float64).index_add_(0, tidx, s) / torch.bincount(tidx, minlength=32)
        mine = [r for r in got if r["layer"] == layer]
        sparsest = [r for r in mine if r["kind"] == "sparsest"]
        densest = [r for r in mine if r["kind"] == "densest"]
        assert [r["sparsity"] for r in sparsest] == pytest.approx(
            sorted(per_token.tolist(), reverse=True)[:3], abs=1e-6)
        assert [r["sparsity"] for r in densest] == pytest.approx(sorted(per_token.tolist())[:3], abs=1e-6)
        for r in sparsest + densest:
            assert r["sequence"] == 0 and r["position"] == r["index"] and r["token"] == texts[r["index"]]
            assert r["sparsity"] == pytest.approx(float(per_token[r["position"]]), abs=1e-6)


def test_cli_prints_token_table_and_refuses_a_store_without_trace(traced, tmp_path, capsys):
    out, data = traced
    assert main(["leaderboard", str(out), "--by", "token", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "sparsest" in text and "densest" in text
    plain = tmp_path / "p.h5"
    assert main(["profile", "tiny-moe", "--data", str(data), "--seq-len", "32", "--batch-size", "1",
                 "--max-tokens", "32", "--types", "i", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(plain), "--by", "token"]) == 2
    assert "--trace-tokens" in capsys.readouterr().err
