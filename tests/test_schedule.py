"""Per-expert schedules: the file, its validation, the store copy, and applying it (sparsify_, generate)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import SHARED_EXPERT_TEXT
from families import tiny
from moeprof.capture import sparsify
from moeprof.cli import main
from moeprof.schedule import Schedule, ScheduleError, ScheduleModelWarning, model_shape, sparsify_, uniform
from moeprof.store import open_store


@pytest.fixture(scope="module")
def moe():
    model = tiny("qwen3_moe")  # 2 layers, 7 experts, top-3, hidden 48, expert width 24
    model.generation_config.pad_token_id = 0
    return model


def _table(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = model_shape(model)
    t = 0.5 + 0.45 * torch.rand(shape["layers"], shape["experts"], generator=g, dtype=torch.float64)
    t[0, 2] = float("nan")  # one expert left dense
    return t


def _schedule(model, **kw):
    return Schedule(_table(model).numpy(), "i", "topp", "tiny-qwen3-moe", model_shape(model),
                    provenance={"task": "ppl:wikipedia", "target": 0.99, "per_expert": np.ones((2, 7))},
                    safe_experts=[(0, 2)], **kw)


def test_schedule_accepts_exactly_the_rules_of_the_rule_table(moe):
    from moeprof import topp
    from moeprof.rules import RULE_TABLE

    for r in RULE_TABLE:  # every rule of the table: a schedule of it validates, and topp has its mask function
        assert Schedule(np.full((2, 7), r.dense), "i", r.name).rule == r.name
        assert callable(getattr(topp, r.mask))
    with pytest.raises(ScheduleError, match="unknown rule 'nope'"):
        Schedule(np.full((2, 7), 0.5), "i", "nope")


def test_schedule_survives_save_and_load_unchanged(moe, tmp_path):
    s = _schedule(moe)
    s.save(tmp_path / "s.json")
    back = Schedule.load(tmp_path / "s.json")
    assert back == s
    np.testing.assert_array_equal(back.p, s.p)  # NaN in the same places, every float bit for bit
    assert np.isnan(back.p[0, 2]) and back.safe_experts == [[0, 2]]
    assert back.provenance["per_expert"] == [[1.0] * 7] * 2
    assert json.loads((tmp_path / "s.json").read_text())["p"][0][2] is None  # NaN is JSON null


def test_schedule_survives_the_store_round_trip(tmp_path):
    from moeprof.store import StoreError, open_store, write_schedule
    from test_report import MOE_PLAN, build_store

    path = build_store(tmp_path / "p.h5", MOE_PLAN, model="m", num_experts=6)  # 2 layers, 6 experts
    p = np.linspace(0.5, 0.95, 12).reshape(2, 6)
    p[1, 3] = np.nan
    s = Schedule(p, "i", "topp", "m", provenance={"target": 0.99}, safe_experts=[[1, 3]])
    write_schedule(path, "cal", s)
    write_schedule(path, "cal", s)  # replacing one of the same name
    with open_store(path) as st:
        assert st.schedule_names() == ["cal"]
        assert st.schedule("cal") == s
        with pytest.raises(StoreError, match="no schedule 'other'"):
            st.schedule("other")
    with pytest.raises(StoreError, match=r"\[3, 7\].*\[2, 6\]"):
        write_schedule(path, "wrong", Schedule(np.full((3, 7), 0.9), "i"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=2), "schema version 2"),
    (lambda d: d.update(type="q"), "unknown activation type 'q'"),
    (lambda d: d.update(rule="median"), "unknown rule 'median'"),
    (lambda d: d["p"][1].__setitem__(3, 1.5), "p = 1.5, outside"),
    (lambda d: d["p"][1].__setitem__(3, -0.1), "p = -0.1, outside"),
    (lambda d: d.pop("format"), "not a moeprof schedule"),
    (lambda d: d.update(p=[[0.9, 0.9]]), r"\[1, 2\] but its model shape says \[2, 7\]"),
])
def test_bad_schedule_file_is_one_line_naming_the_problem(moe, tmp_path, edit, message):
    d = _schedule(moe).to_dict()
    edit(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match=message) as err:
        Schedule.load(tmp_path / "bad.json")
    assert "\n" not in str(err.value)


def _set(path, value):
    """Return an edit that sets the field at `path` ("provenance.sparsity_flop", "p.1.3") of a schedule's JSON."""
    *parents, last = path.split(".")

    def edit(d):
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d.setdefault(k, {})
        d[int(last) if isinstance(d, list) else last] = value
    return edit


# every field of the file, given a value of the wrong kind: refused where the file is read, naming file and field
@pytest.mark.parametrize("field, value", [
    ("provenance", "garbage"),                          # D4: was an AttributeError in leaderboard / plot
    ("provenance.per_expert_sparsity", [[0.5, 0.5]]),   # D4: wrong shape, was an IndexError
    ("provenance.per_expert_sparsity", [[5.0] * 7] * 2),  # D5: an impossible sparsity
    ("provenance.sparsity_flop", "high"),               # D4: was "Unknown format code 'f'"
    ("provenance.sparsity_flop", 1.5),
    ("provenance.target", [0.9]),
    ("provenance.heldout_ratio_ci", "narrow"),
    ("safe_experts", "all"),                            # D6: was "not enough values to unpack"
    ("safe_experts", [[0, 9]]),
    ("safe_experts", [[0]]),
    ("safe_experts", [["0", 1]]),
    ("p.1.3", "0.9"),                                   # D21: a string p
    ("p.1.3", True),                                    # D21: a boolean p
    ("p.1", 0.9),
    ("model", 7),
    ("type", ["i"]),
    ("rule", {"name": "topp"}),
    ("shape", "2x7"),
    ("shape.layers", "two"),
])
def test_each_schedule_field_of_the_wrong_kind_is_refused_naming_file_and_field(moe, tmp_path, field, value):
    d = _schedule(moe).to_dict()
    _set(field, value)(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ScheduleError) as err:
        Schedule.load(tmp_path / "bad.json")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "bad.json") in msg
    top = field.split(".")[0]
    assert f"field '{field if top in ('provenance', 'shape') else top}'" in msg, msg


def test_a_valid_schedule_file_with_every_optional_field_null_or_absent_loads(moe, tmp_path):
    d = _schedule(moe).to_dict()
    d["provenance"].update(sparsity_flop=None, per_expert_sparsity=[[None] * 7, [0.0] * 7], heldout_ratio_ci=None)
    for key in ("safe_experts", "model", "rule"):
        d.pop(key)
    (tmp_path / "ok.json").write_text(json.dumps(d))
    s = Schedule.load(tmp_path / "ok.json")
    assert s.safe_experts == [] and s.rule == "topp" and s.provenance["sparsity_flop"] is None


def test_schedule_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "s.json").write_text("p: [0.9]\n")
    with pytest.raises(ScheduleError, match="is not JSON"):
        Schedule.load(tmp_path / "s.json")


def test_schedule_of_another_shape_names_both_shapes(moe):
    s = Schedule(np.full((2, 7), 0.9), "i", shape={"layers": 2, "experts": 7, "hidden": 64, "intermediate": 24})
    with pytest.raises(ScheduleError, match=r"hidden 64.*this model is \[layers 2, experts 7, hidden 48"):
        sparsify_(moe, s)
    assert moe.config._experts_implementation != "moeprof"  # nothing was left applied


def test_schedule_of_another_model_id_with_the_same_shape_warns(moe):
    s = _schedule(moe)
    s.model = "someone/else"
    with pytest.warns(ScheduleModelWarning, match="someone/else"):
        sparsify_(moe, s).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify_(moe, s, model_id="else").remove()  # same last path part: the same model


def test_applying_a_schedule_gives_the_logits_of_sparsify_with_its_table(moe):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    s = _schedule(moe)
    with torch.no_grad():
        dense = moe(ids).logits
        with sparsify(moe, type="i", p=torch.as_tensor(s.p)) as r_table:
            want = moe(ids).logits
        handle = sparsify_(moe, s, model_id="tiny-qwen3-moe")
        got = moe(ids).logits
        handle.remove()
        after = moe(ids).logits
        with sparsify_(moe, s, model_id="tiny-qwen3-moe"):
            scoped = moe(ids).logits
    assert not torch.allclose(want, dense, atol=1e-4)  # the schedule does something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(scoped, want, rtol=0, atol=0)
    torch.testing.assert_close(after, dense, rtol=0, atol=0)  # remove() restored the model exactly
    assert torch.equal(handle.realized.tokens, r_table.tokens)
    assert int(handle.realized.tokens[0, 2]) == 0  # the NaN expert stayed dense


def test_uniform_schedule_equals_the_scalar_p_path(moe):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with sparsify(moe, type="x", p=0.8) as r_scalar:
            want = moe(ids).logits
        with sparsify_(moe, uniform(moe, type="x", p=0.8)) as handle:
            got = moe(ids).logits
        r_sched = handle.realized
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert r_sched.token_weighted == r_scalar.token_weighted > 0


def test_cached_generation_with_a_schedule_matches_uncached_forward_step_by_step(moe):
    """Batch 2 with left padding: each generated step's logits equal a full no-cache forward of the same
    sparsified model on the sequence so far (greedy, so the tokens agree too)."""
    s = _schedule(moe)
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 8], [4, 9, 61, 22, 7, 13, 40]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    handle = sparsify_(moe, s, model_id="tiny-qwen3-moe")
    try:
        out = moe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
                           output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        for step, logits in enumerate(out.logits):
            n = ids.shape[1] + step
            m = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], dim=1)
            with torch.no_grad():
                full = moe(input_ids=seq[:, :n], attention_mask=m, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
            assert torch.equal(seq[:, n], full.argmax(-1))
        single = moe.generate(input_ids=ids[1:], max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(single, seq[1:])  # batch 1 gives the unpadded row's tokens
        assert int(handle.realized.tokens.sum()) > 0
    finally:
        handle.remove()
    assert moe.config._experts_implementation != "moeprof"


def test_leaderboard_puts_scheduled_p_and_sparsity_beside_each_expert(tmp_path, capsys):
    from moeprof.cli import main
    from moeprof.report.leaderboard import leaderboard_rows, schedule_columns
    from moeprof.store import open_store
    from test_report import MOE_PLAN, build_store

    path = build_store(tmp_path / "p.h5", MOE_PLAN, model="m", num_experts=6)
    p = np.linspace(0.5, 0.95, 12).reshape(2, 6)
    p[1, 4] = np.nan
    realized = np.arange(12, dtype=float).reshape(2, 6) / 20
    s = Schedule(p, "i", "topp", "m", provenance={"per_expert_sparsity": realized})
    s.save(tmp_path / "s.json")
    with open_store(path) as st:
        rows = leaderboard_rows(st, type="i", p=0.9, top=None)
        schedule_columns(st, Schedule.load(tmp_path / "s.json"), rows)
    for r in rows:
        want = p[r["layer"], r["expert"]]
        assert (np.isnan(r["sched_p"]) and np.isnan(want)) or r["sched_p"] == want
        assert r["sched_s"] == realized[r["layer"], r["expert"]]
    assert main(["leaderboard", str(path), "--schedule", str(tmp_path / "s.json"), "--top", "50"]) == 0
    out = capsys.readouterr().out
    assert "sched p" in out and "dense" in out and "0.950" in out
    assert main(["plot", "--schedule", str(tmp_path / "s.json"), "-o", str(tmp_path / "plots")]) == 0
    png = tmp_path / "plots" / "s_heatmap_p.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    wrong = Schedule(np.full((3, 6), 0.9), "i")
    wrong.save(tmp_path / "w.json")
    assert main(["leaderboard", str(path), "--schedule", str(tmp_path / "w.json")]) == 2
    assert "[3, 6]" in capsys.readouterr().err


def test_overall_sparsity_counts_the_work_of_experts_left_dense_as_zero(moe):
    """A schedule's figure of merit is the FLOP-weighted sparsity of ALL the FFN work: vectors through an expert
    left dense (NaN) count 0. Reference: the same run with those NaNs replaced by p = 1 (nothing dropped, the
    same routing since only the last layer differs) counts every vector as sparsified."""
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(4))
    table = _table(moe)
    table[0, 2] = 0.7  # layer 0 fully scheduled: the last layer's routing is the same in both runs
    table[1, [1, 3, 4]] = float("nan")
    full = torch.where(table.isnan(), torch.ones_like(table), table)
    with torch.no_grad():
        with sparsify(moe, type="i", p=table) as a:
            moe(ids)
        with sparsify(moe, type="i", p=full) as b:
            moe(ids)
    assert torch.equal(a.tokens + a.dense_tokens, b.tokens) and int(a.dense_tokens[1].sum()) > 0
    assert int(a.dense_tokens[0].sum()) == 0
    F = a.flops_per_token[:, None]
    want = float((a.sparsity_sum * F).sum() / (b.tokens.double() * F).sum())
    assert a.overall_flop_weighted == pytest.approx(want, rel=1e-12)
    assert a.overall_flop_weighted < a.flop_weighted  # the sparsified-only figure overstates the model's


def test_overall_sparsity_of_a_dense_model_is_the_mean_over_all_layers():
    """Hand-computed: in a dense model every layer sees every token with the same FLOPs, so leaving half the
    layers dense halves the FLOP-weighted sparsity of the other half."""
    model = tiny("llama")
    L = model.config.num_hidden_layers
    table = torch.full((L, 1), float("nan"), dtype=torch.float64)
    table[: L // 2] = 0.6
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), sparsify(model, type="i", p=table) as r:
        model(ids)
    assert L >= 2 and int(r.dense_tokens.sum()) == (L - L // 2) * ids.numel()
    assert r.overall_flop_weighted == pytest.approx(r.flop_weighted * (L // 2) / L, rel=1e-12)


def test_schedule_out_refuses_a_file_that_is_not_a_schedule(qwen2_moe, tmp_path, capsys):
    folder, _, store = qwen2_moe
    text = tmp_path / "text.txt"
    text.write_text(SHARED_EXPERT_TEXT)
    before = text.read_bytes()
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--out", str(text)])  # the data itself
    assert code == 2 and "--force" in capsys.readouterr().err and text.read_bytes() == before
    code = main(["schedule", str(folder), "--task", f"ppl:{text}", "--out", str(store)])  # the profile store
    assert code == 2 and open_store(store).num_layers == 3


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


def test_generate_refuses_an_empty_prompt_before_loading_the_model(tmp_path, capsys):
    from conftest import refused

    refused(capsys, "generate", "tiny-moe", "--p", "0.9", "--prompt", "", match="--prompt is empty")
    refused(capsys, "generate", "tiny-moe", "--p", "0.9", "--prompt", "  ", match="--prompt is empty")
