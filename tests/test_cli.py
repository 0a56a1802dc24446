"""`moeprof profile / info / leaderboard` end to end on a tiny MoE checkpoint, and every bad input."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import refused, run_cli, save_tiny_checkpoint, tiny_tokenizer
from families import tiny

from moeprof.cli import main
from moeprof.models import load_model
from moeprof.store import SCHEMA_VERSION, open_store
from moeprof.topp import DEFAULT_P_GRID, topp_curve

TEXT = ("The experts of a mixture-of-experts layer each see only the tokens the router sends them. "
        "Profiling their activations shows how many entries carry most of the mass. ") * 30


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny("qwen3_moe", vocab_size=len(tok))
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe"), model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i * 200:(i + 1) * 200 + 300]}) for i in range(20)))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_writes_store_with_public_contract(moe_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "run.h5"
    code, stdout, err = run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 32,
                            "--max-tokens", 256, "--batch-size", 3, "--trace-tokens", 10)
    assert code == 0, err
    assert "wrote" in stdout and str(out) in stdout.replace("\n", "")
    with h5py.File(out) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and "tiny-moe" in f.attrs["model"]
        assert f["p_grid"][()].tolist() == list(DEFAULT_P_GRID)
        tokens = f["routing/tokens"][()]
        assert tokens.shape == (2, 7) and tokens.dtype == np.int64
        assert tokens.sum() == 2 * 256 * 3  # 256 tokens, 3 experts each, in each of 2 layers
        for t in "xugi":
            mean = f[f"sparsity/{t}/mean"][()]
            assert mean.shape == (2, 7, len(DEFAULT_P_GRID))
            seen = tokens > 0
            assert np.all(np.diff(mean[seen], axis=-1) <= 1e-12)  # sparsity falls as p grows
            assert f[f"sparsity/{t}/mean"].attrs["doc"] and f[f"sparsity/{t}/mean"].attrs["units"]
        assert f["trace/expert"].shape == (10, 2, 3) and len(f["trace/token_text"]) == 10
    # The store's numbers equal a recomputation: layer-0 x curves from the embedding output.
    model, tok = load_model(moe_checkpoint)
    ids = torch.tensor(tok(json.loads(data_file.read_text().splitlines()[0])["text"],
                           add_special_tokens=False)["input_ids"][:32])
    with h5py.File(out) as f:
        trace_x = f["trace/sparsity_x"][()]
    with torch.no_grad():
        hidden = model.model.layers[0].post_attention_layernorm(
            model.model.layers[0].self_attn(model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None])),
                                            position_embeddings=model.model.rotary_emb(model.model.embed_tokens(ids[None]), torch.arange(32)[None]),
                                            attention_mask=None)[0] + model.model.embed_tokens(ids[None]))
    want = 1 - topp_curve(hidden[0, :10], DEFAULT_P_GRID).numpy() / 48
    assert np.allclose(trace_x[:, 0, 0], want, atol=1.01 / 48)


def test_info_and_leaderboard_read_the_store(moe_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 32,
               "--max-tokens", 128, "--types", "i,x")[0] == 0
    code, stdout, _ = run(capsys, "info", out, "--verbose")
    assert code == 0 and "sparsity/i/mean" in stdout and "routing/tokens" in stdout
    code, stdout, _ = run(capsys, "leaderboard", out, "--type", "i", "--p", "0.9", "--top", "5")
    assert code == 0 and "expert" in stdout.lower()
    with open_store(out) as st:  # the top row printed is the sparsest expert at p = 0.9
        mean = st.mean("i")[..., st.p_index(0.9)]
        layer, expert = np.unravel_index(np.nanargmax(mean), mean.shape)
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:3] == ["#", "layer", "expert"])
    top_row = next(l for l in lines[header + 1:] if l.strip().startswith("1 "))
    assert top_row.split()[1:3] == [str(layer), str(expert)] and f"{np.nanmax(mean):.3f}" in top_row


def test_recipe_values_are_used_and_flags_override_them(moe_checkpoint, data_file, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{moe_checkpoint}"\ndata = ["{data_file}"]\np_grid = [0.6, 0.9]\n'
                      f'types = ["i"]\nseq_len = 16\nmax_tokens = 64\nbatch_size = 2\n')
    out = tmp_path / "r.h5"
    assert run(capsys, "profile", "--recipe", recipe, "--out", out, "--max-tokens", 32)[0] == 0
    with open_store(out) as st:
        assert st.p_grid.tolist() == [0.6, 0.9] and st.types == ["i"]
        assert st.attrs["tokens"] == 32 and st.attrs["seq_len"] == 16


def one_line_error(capsys, *argv, match):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    assert match.lower() in " ".join(err.split()).lower(), err


def test_bad_inputs_give_one_clear_line_and_nonzero_exit(moe_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "o.h5"
    base = ["--data", data_file, "--out", out, "--seq-len", 16, "--max-tokens", 32]
    one_line_error(capsys, "profile", tmp_path / "nope", *base, match="no such file or folder")
    (tmp_path / "empty_dir").mkdir()
    one_line_error(capsys, "profile", tmp_path / "empty_dir", *base, match="config.json")
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    save_tiny_checkpoint(gpt2, model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=320)))
    capsys.readouterr()
    one_line_error(capsys, "profile", gpt2, *base, match="supported model types")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, "profile", moe_checkpoint, "--data", empty, "--out", out, match="fewer than")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    one_line_error(capsys, "profile", moe_checkpoint, "--data", short, "--out", out, "--seq-len", 64,
                   match="fewer than --seq-len 64")
    one_line_error(capsys, "profile", moe_checkpoint, *base, "--p-grid", "0.5,1.2", match="[0, 1]")
    one_line_error(capsys, "profile", moe_checkpoint, *base, "--types", "x,q", match="unknown activation type")
    one_line_error(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", tmp_path / "no" / "o.h5",
                   match="does not exist")
    one_line_error(capsys, "profile", moe_checkpoint, "--data", tmp_path / "missing.txt", "--out", out,
                   match="does not exist")
    assert not out.exists()
    one_line_error(capsys, "info", data_file, match="not an HDF5 file")
    one_line_error(capsys, "info", tmp_path / "missing.h5", match="does not exist")


def test_unwritable_output_folder_is_reported(moe_checkpoint, data_file, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr("moeprof.atomic.os.access", lambda p, mode: False if Path(p) == tmp_path / "ro" else
                        real_access(p, mode))
    (tmp_path / "ro").mkdir()
    one_line_error(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", tmp_path / "ro" / "o.h5",
                   match="not writable")


def test_not_a_store_and_newer_schema_are_rejected(tmp_path, capsys):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    one_line_error(capsys, "info", other, match="not a moeprof store")
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs["format"] = "moeprof-profile"
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    one_line_error(capsys, "info", newer, match="upgrade moeprof")


def test_interrupted_profile_leaves_no_file_and_keeps_the_old_one(moe_checkpoint, data_file, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "keep.h5"
    assert run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 16,
               "--max-tokens", 32)[0] == 0
    before = out.read_bytes()
    calls = {"n": 0}
    import moeprof.profile as prof

    real = prof.iter_batches

    def interrupted(*a, **k):
        for batch in real(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(prof, "iter_batches", interrupted)
    code, _, err = run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 16,
                       "--max-tokens", 128, "--batch-size", 1)
    assert code == 130 and "interrupted" in err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


def test_interrupt_while_writing_leaves_no_partial_file(moe_checkpoint, data_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new.h5"
    import moeprof.store.schema as store

    real_put = store._put
    calls = {"n": 0}

    def put(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_put(*a, **k)

    monkeypatch.setattr(store, "_put", put)
    code, _, _ = run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 16,
                     "--max-tokens", 32)
    assert code == 130 and list(tmp_path.iterdir()) == []


def test_jsonl_is_recognised_by_content_and_rows_need_text(tmp_path):
    from moeprof.data import DataError, iter_documents

    named_txt = tmp_path / "rows.txt"
    named_txt.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert list(iter_documents([named_txt])) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="no string 'text' field"):
        list(iter_documents([bad]))


def test_profile_store_carries_outlier_statistics(moe_checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "o.h5"
    assert run(capsys, "profile", moe_checkpoint, "--data", data_file, "--out", out, "--seq-len", 32,
               "--max-tokens", 64, "--types", "i")[0] == 0
    with h5py.File(out) as f:
        tokens = f["routing/tokens"][()].astype(float)
        share = f["outliers/load_share"][()]
        assert np.allclose(share, tokens / tokens.sum(-1, keepdims=True))
        assert (f["outliers/dead"][()] == (tokens == 0)).all()
        assert np.allclose(f["outliers/max_mean_load"][()], tokens.max(-1) / tokens.mean(-1))
        mean = f["sparsity/i/mean"][()]
        z = f["outliers/i/sparsity_z"][()]
        j = list(f["p_grid"][()]).index(0.9)
        for layer in range(2):
            live = tokens[layer] > 0
            s = mean[layer, live, j]
            mad = np.median(np.abs(s - np.median(s)))
            if mad > 0:
                assert np.allclose(z[layer, live, j], (s - np.median(s)) / (1.4826 * mad))
        assert (f["outliers/i/flagged"][()] == (np.abs(np.nan_to_num(z)) > 3.5)).all()


def test_atomic_writers_leave_no_partial_file_on_error(tmp_path):
    from moeprof.atomic import write_jsonl

    target = tmp_path / "rows.jsonl"
    write_jsonl(target, [{"text": "old"}])

    def rows():
        yield {"text": "new"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(target, rows())
    assert target.read_text() == '{"text": "old"}\n' and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_profile_counts_and_seq_len_beyond_the_model(moe_ckpt, moe_text, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", str(moe_ckpt), "--data", str(moe_text), "--trace-tokens", "-3"])
    assert exc.value.code == 2 and "--trace-tokens: must be at least 0" in capsys.readouterr().err
    code, out, err = run_cli(capsys, "profile", moe_ckpt, "--data", moe_text, "--out", tmp_path / "long.h5", "--seq-len", 80,
                         "--max-tokens", 80, "--batch-size", 1)
    assert code == 0, err
    assert "--seq-len 80 is beyond qwen3_moe's maximum positions (64)" in " ".join(out.split())


def test_jsonl_rows_that_are_arrays_and_recipe_items_of_the_wrong_type(moe_ckpt, tmp_path, capsys):
    arrays = tmp_path / "a.jsonl"
    arrays.write_text('["some", "text"]\n["more"]\n')
    refused(capsys, "profile", moe_ckpt, "--data", arrays, "--out", tmp_path / "a.h5", match="a.jsonl:1 is a JSON array")
    for body, match in [("types = [1, 2]", "types must be a non-empty list of strings"),
                        ('p_grid = ["a"]', "p_grid must be a non-empty list of numbers"),
                        ("data = [3]", "data must be a non-empty list of strings"),
                        ("max_tokens = 0", "--max-tokens must be a whole number >= 1")]:
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'model = "{moe_ckpt}"\ndata = "{arrays}"\n' * ("data" not in body) + f"{body}\n"
                          + (f'model = "{moe_ckpt}"\n' if "data" in body else ""))
        refused(capsys, "profile", "--recipe", recipe, "--out", tmp_path / "r.h5", match=match)


def test_a_moeprof_error_from_inside_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    import moeprof.cli.reports as reports
    from moeprof.errors import InvalidArgument

    def refuse(args):
        raise InvalidArgument("the value is wrong; give another")

    monkeypatch.setattr(reports, "cmd_info", refuse)
    one_line_error(capsys, "info", tmp_path / "x.h5", match="the value is wrong; give another")


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), ValueError("an internal invariant broke"),
                                 KeyError("missing")])
def test_an_unexpected_exception_is_a_bug_shown_with_its_traceback(exc, monkeypatch, tmp_path, capsys):
    import moeprof.cli.reports as reports

    def broken(args):
        raise exc

    monkeypatch.setattr(reports, "cmd_info", broken)
    code, _, err = run(capsys, "info", tmp_path / "x.h5")
    assert code == 1, err
    assert "Traceback" in err and type(exc).__name__ in err and "broken" in err  # where it was raised
    assert "is a bug in moeprof" in err and "please report it" in err


def test_every_user_error_class_is_a_moeprof_error():
    from moeprof.arch import UnsupportedArchitecture
    from moeprof.atomic import DiskFullError, OutputError
    from moeprof.capture import NonFiniteActivation
    from moeprof.critical.search import CriticalSearchError
    from moeprof.data import DataError
    from moeprof.distributed import DistributedError
    from moeprof.errors import InvalidArgument, MoeprofError, UsageError
    from moeprof.evaluate.journal import JournalError
    from moeprof.evaluate.tasks import TaskDataMissing, UnknownTaskError
    from moeprof.merge import MergeError
    from moeprof.models import ModelLoadError
    from moeprof.optimize import OptimizeConfigError
    from moeprof.recipes import RecipeError
    from moeprof.report.html import ReportError
    from moeprof.resources import ResourceError
    from moeprof.rules import UnknownRuleError
    from moeprof.schedule import ScheduleError
    from moeprof.store import StoreError

    classes = [UnsupportedArchitecture, DiskFullError, OutputError, NonFiniteActivation, CriticalSearchError,
               DataError, DistributedError, InvalidArgument, UsageError, TaskDataMissing, UnknownTaskError, MergeError,
               ModelLoadError, OptimizeConfigError, RecipeError, ReportError, ResourceError, ScheduleError, StoreError,
               UnknownRuleError, JournalError]
    assert [c.__name__ for c in classes if not issubclass(c, MoeprofError)] == []
    # the ones that replaced a ValueError still are one, so `except ValueError` in callers keeps working
    assert [c.__name__ for c in (InvalidArgument, UsageError, StoreError, OutputError, DataError, ScheduleError,
                                 UnsupportedArchitecture, OptimizeConfigError, ReportError, UnknownRuleError)
            if not issubclass(c, ValueError)] == []
