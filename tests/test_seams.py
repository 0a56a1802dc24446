"""Where the merged branches meet: commands of one branch run on what another added.

A tiny random Qwen2-MoE (layer 0 dense, layer 1 routed + shared: three site rows for two decoder layers) goes
through --rank-layers, the leaderboards' --layer, the stability store, merge and `moeprof schedule --out/--from`.
"""

import json

import h5py
import numpy as np
import pytest
from conftest import save_tiny_checkpoint, tiny_tokenizer
from moe_families import build

from moeprof.cli import main
from moeprof.report.leaderboard import (layer_summary, leaderboard, leaderboard_rows, token_leaderboard,
                                      token_leaderboard_rows)
from moeprof.store import open_store

TEXT = ("Routed experts see only the tokens the router sends them; shared experts see every token. ") * 40


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """(checkpoint folder, data file, store profiled with --rank --rank-layers 1 --trace-tokens 16)."""
    root = tmp_path_factory.mktemp("seams")
    tok = tiny_tokenizer()
    folder = save_tiny_checkpoint(root / "qwen2_moe", model=build("qwen2_moe", vocab_size=len(tok)), tokenizer=tok)
    data = root / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": TEXT[i * 150:(i + 1) * 150 + 300]}) for i in range(12)))
    out = root / "run.h5"
    assert main(["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", "16", "--max-tokens",
                 "64", "--batch-size", "2", "--types", "x,i", "--rank", "--rank-layers", "1",
                 "--trace-tokens", "16"]) == 0
    with h5py.File(out) as f:  # the layout the tests below rely on
        assert [k.decode() for k in f["sites/kind"][()]] == ["dense", "routed", "shared"]
        assert f["sites/layer"][()].tolist() == [0, 1, 1]
    return folder, data, out


def test_rank_layers_keep_every_site_of_the_layer(qwen2_moe, tmp_path, capsys):
    _, _, out = qwen2_moe
    with open_store(out) as st:
        erank, _ = st.effective_rank("i")
        with h5py.File(out) as f:
            assert f["rank/i"].attrs["layers"].tolist() == [1, 2]  # rows of layer 1: routed and shared
            vectors = f["rank/i/vectors"][()]
            # the Gram is as wide as the kept sites (experts and shared expert: 32), not layer 0's dense MLP (64)
            assert f["rank/i/gram"].shape == (2, 4, 32, 32) and f["rank/x/gram"].shape == (2, 4, 48, 48)
        assert np.isnan(erank[0]).all() and vectors[0].sum() == 0  # layer 0 (dense) not kept
        assert np.isfinite(erank[1]).all() and np.isfinite(erank[2, 0])  # the shared expert is layer 1's too
        assert vectors[2, 0] == 64  # every token went through it
    folder, data, _ = qwen2_moe
    code = main(["profile", str(folder), "--data", str(data), "--out", str(tmp_path / "x.h5"), "--max-tokens", "16",
                 "--seq-len", "16", "--rank", "--rank-layers", "2"])
    assert code == 2 and "layers 0..1" in capsys.readouterr().err  # the model's decoder layers, not its rows


def test_leaderboard_layer_is_a_decoder_layer(qwen2_moe):
    _, _, out = qwen2_moe
    with open_store(out) as st:
        rows = leaderboard_rows(st, layer=1, top=None)
        assert sorted((r["layer"], r["expert"]) for r in rows) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
        assert [(r["layer"], r["expert"]) for r in leaderboard_rows(st, layer=0, top=None)] == [(0, 0)]
        with pytest.raises(ValueError, match=r"layers 0\.\.1"):
            leaderboard_rows(st, layer=2)
        tokens = token_leaderboard_rows(st, layer=1, top=2)
        assert sorted({r["layer"] for r in tokens}) == [1, 2]
        with pytest.raises(ValueError, match=r"layers 0\.\.1"):
            token_leaderboard_rows(st, layer=2)
        layer_col = [c for c in layer_summary(st).columns if c.header == "layer"][0]
        assert list(layer_col.cells) == ["0", "1", "1"]
        layer_col = [c for c in token_leaderboard(st, top=1).columns if c.header == "layer"][0]
        assert list(layer_col.cells) == ["0 dense", "0 dense", "1", "1", "1 shared", "1 shared"]


def test_stability_store_records_the_decoder_layer_of_each_site_and_is_not_merged(qwen2_moe, tmp_path, capsys):
    from moeprof.models import load_model
    from moeprof.stability import stability_run

    folder, _, _ = qwen2_moe
    model, tok = load_model(str(folder))
    out = tmp_path / "st.h5"
    stability_run(model, tok, ["The capital of France"], out, model_id="q", max_new_tokens=3, max_gap=2,
                  show_progress=False)
    with open_store(out) as st:
        assert st.sites().kind == ["dense", "routed", "shared"]
        assert st.sites().layer.tolist() == [0, 1, 1]
        assert st.sites().label(2) == "1 shared"
    other = tmp_path / "st2.h5"
    stability_run(model, tok, ["A mixture of experts"], other, model_id="q", max_new_tokens=3, max_gap=2,
                  show_progress=False)
    code = main(["merge", str(out), str(other), "-o", str(tmp_path / "m.h5")])  # it would drop /stability
    assert code == 2 and "/stability" in capsys.readouterr().err and not (tmp_path / "m.h5").exists()


def test_merge_keeps_the_models_parameters_and_router(qwen2_moe, tmp_path, capsys):
    folder, data, whole = qwen2_moe
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        assert main(["profile", str(folder), "--data", str(data), "--out", str(s), "--seq-len", "16",
                     "--max-tokens", "32", "--batch-size", "1", "--types", "i", "--shard", f"{i}/2"]) == 0
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "m.h5")]) == 0
    with open_store(whole) as a, open_store(tmp_path / "m.h5") as m:
        assert m.parameters() == a.parameters() and m.parameters()["active"] < m.parameters()["total"]
        assert json.loads(m.attrs["router"]) == json.loads(a.attrs["router"])


def test_schedule_out_refuses_a_file_that_is_not_a_schedule(qwen2_moe, tmp_path, capsys):
    folder, _, store = qwen2_moe
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    before = text.read_bytes()
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--out", str(text)])  # the data itself
    assert code == 2 and "--force" in capsys.readouterr().err and text.read_bytes() == before
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--out", str(store)])  # the profile store
    assert code == 2 and open_store(store).num_layers == 3


def test_schedule_from_another_models_store_is_refused_before_optimizing(qwen2_moe, tiny_checkpoint, tmp_path,
                                                                          capsys):
    folder, data, _ = qwen2_moe
    dense = tmp_path / "dense.h5"
    assert main(["profile", str(tiny_checkpoint), "--data", str(data), "--out", str(dense), "--seq-len", "16",
                 "--max-tokens", "16", "--types", "i"]) == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--from", str(dense), "--out",
                 str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert code == 2 and "[layers, experts] = (2, 1)" in captured.err, captured.err
    assert "evaluation" not in captured.out and not (tmp_path / "s.json").exists()


def test_nonfinite_error_names_the_decoder_layer_and_site_kind():
    import torch

    from moeprof.arch import adapter_for
    from moeprof.capture import NonFiniteActivation, profile_capture
    from moeprof.stats import ProfileStats

    model = build("qwen2_moe")
    sites = adapter_for(model).sites(model)
    shared = [s for s in sites if s.kind == "shared"][0]
    assert (shared.layer, shared.row) == (1, 2)
    with torch.no_grad():
        shared.module.up_proj.weight[0, 0] = float("inf")
    stats = ProfileStats(len(sites), max(s.num_experts for s in sites), (0.5, 0.9), ("u",))
    with pytest.raises(NonFiniteActivation, match=r"at layer 1 \(shared\), expert 0, type u"):
        with profile_capture(model, stats, sites=sites), torch.no_grad():
            model(torch.arange(8).view(1, 8))
    # `moeprof stability` (no --on-nonfinite flag) meets the same error: the hint names the command that has it
    from moeprof.capture import Engine, attach
    from moeprof.stability import MaskRecorder

    with pytest.raises(NonFiniteActivation, match=r"\(`moeprof profile`: the one command that can\) pass "
                                                  r"--on-nonfinite skip"):
        with attach(model, Engine(sites, observers=[MaskRecorder("u", 0.9)])), torch.no_grad():
            model(torch.arange(8).view(1, 8))


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


def test_generate_with_a_uniform_p_warns_of_no_other_model(qwen2_moe, monkeypatch, capsys):
    import warnings

    import moeprof.models
    from moeprof.schedule import ScheduleModelWarning

    folder, _, _ = qwen2_moe
    # a model whose recorded id differs from its config's name_or_path (SmolLM2: the hub id vs the cache folder)
    monkeypatch.setattr(moeprof.models, "model_id", lambda spec: "someone/else")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", str(folder), "--p", "0.5", "--prompt", "The capital", "--max-new-tokens", "2"]) == 0
    assert not [w for w in caught if issubclass(w.category, ScheduleModelWarning)]


def test_compare_reads_the_latest_search_of_each_type(qwen2_moe, tmp_path):
    from moeprof.report.compare import compare_rows
    from moeprof.store import Critical, write_critical

    _, _, store = qwen2_moe
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for path in paths:
        path.write_bytes(store.read_bytes())
    for t, s in (("x", 0.21), ("i", 0.52), ("i", 0.55)):  # x searched first, then i twice (tasks t0, t1)
        write_critical(paths[0], Critical({"type": t, "rule": "topp", "task": f"t{int(s * 100) % 2}",
                                           "critical_p": 0.5, "critical_sparsity_token": s,
                                           "critical_sparsity_flop": s}))
    stores = [open_store(p) for p in paths]
    try:
        a, b = compare_rows(stores)
    finally:
        for st in stores:
            st.close()
    assert a["critical"]["type"] == "i" and a["critical"]["sparsity_token"] == 0.55  # the latest search
    assert {t: c["sparsity_token"] for t, c in a["criticals"].items()} == {"x": 0.21, "i": 0.55}
    assert b["critical"] is None and b["criticals"] == {}


def test_a_cli_made_schedule_fits_the_loaded_smollm2_without_a_model_warning(smollm2):
    import warnings

    from moeprof.models import model_id
    from moeprof.schedule import ScheduleModelWarning, loaded_model_id, sparsify_, uniform

    model, _ = smollm2
    assert loaded_model_id(model) == model_id("smollm2")  # not the cache folder it was loaded from
    s = uniform(model, type="i", p=0.9, model_id=model_id("smollm2"))  # as `moeprof schedule smollm2`
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleModelWarning)  # docs/schedules.md: `moeprof.sparsify_(model, s)`
        sparsify_(model, s).remove()


def test_dead_experts_are_named_by_decoder_layer(tmp_path):
    import torch

    from moeprof.profile import profile

    tok = tiny_tokenizer()
    model = build("deepseek_v3", vocab_size=len(tok), num_hidden_layers=3)  # rows: 0 dense, 1 + 1 shared, 2 + 2 shared
    with torch.no_grad():  # expert 3 of layer 2 (row 3) is never selected
        model.model.layers[2].mlp.gate.e_score_correction_bias[3] = -100.0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = profile(model, tok, [str(text)], tmp_path / "d.h5", model_id="d", max_tokens=32, seq_len=16,
                  batch_size=2, show_progress=False, types=("i",)).path
    with open_store(out) as st:
        assert st.sites().layer.tolist() == [0, 1, 1, 2, 2] and st.dead().nonzero()[0].tolist() == [3]
        assert "dead (0 tokens, not ranked): 1: L2 E3" in str(leaderboard(st, top=3).caption)
        assert sorted(r["expert"] for r in leaderboard_rows(st, layer=2, top=None) if r["layer"] == 3) == [0, 1, 2]


def _hand_store(path, model="hand/moe", config=None):
    import torch

    from moeprof.stats import ProfileStats, VectorSummary
    from moeprof.store import ProfileMeta, write_profile

    stats = ProfileStats(2, 4, (0.5, 0.9), ("i",))
    for row in range(2):
        ids = torch.tensor([0, 1, 1, 3])
        stats.activations["i"].add(row, ids, VectorSummary.of(torch.arange(1.0, 9.0).repeat(4, 1), (0.5, 0.9)))
        stats.routing.add(row, ids[:, None], torch.ones(4, 1, dtype=torch.float64))
    meta = ProfileMeta(model=model, model_type="test", architecture="Test", is_moe=True, top_k=1, hidden_size=8,
                       model_config=config or {"model_type": "test", "num_local_experts": 4}, data_sources=["hand"],
                       tokens=4, seq_len=4, batch_size=1, dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[8, 8], site_kinds=["routed", "routed"])


def test_replacing_a_store_keeps_its_results_only_for_the_same_model_and_config(tmp_path):
    from moeprof.schedule import Schedule
    from moeprof.store import StoreError, check_replace, write_schedule

    path = _hand_store(tmp_path / "s.h5")
    write_schedule(path, "kept", Schedule(np.full((2, 4), 0.9), "i"))
    _hand_store(path)  # the same model again: its schedule is kept
    with open_store(path) as st:
        assert st.schedule_names() == ["kept"]
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"holds /schedules of 'hand/moe', not 'other/moe'"):
        _hand_store(path, model="other/moe")  # same shape, another model: its results would describe nothing
    with pytest.raises(StoreError, match="another config"):
        _hand_store(path, config={"model_type": "test", "num_local_experts": 4, "num_hidden_layers": 7})
    with pytest.raises(StoreError, match="not 'other/moe'"):  # the same check before a run
        check_replace(path, 2, 4, "other/moe", {"model_type": "test"})
    assert path.read_bytes() == before  # nothing written


def test_leaderboard_with_a_missing_schedule_prints_nothing_but_the_error(tmp_path, capsys):
    path = _hand_store(tmp_path / "s.h5")
    code = main(["leaderboard", str(path), "--schedule", str(tmp_path / "missing.json")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "missing.json" in err
