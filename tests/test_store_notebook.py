"""A store that reads itself in a notebook: named dims on every array, text as str, string arrays for lists,
`to_dataframe` / `moeprof export`, and a table in docs/store.md that lists every dataset of the schema table."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import profile_store, refused

from moeprof.cli import main
from moeprof.stats import STATISTICS
from moeprof.store import (DIM_LABELS, Critical, open_store, schema_table, update_store, write_critical)
from tests.test_load_metrics import COUNTS, _store

STORE_DOC = Path(__file__).resolve().parents[1] / "docs" / "store.md"


def _documented_paths() -> set[str]:
    """Every backticked /path of the layout table of docs/store.md, braces expanded and <t> written as {type}."""
    text = STORE_DOC.read_text()
    section = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 5)]
    rows = [line for line in section.splitlines() if line.startswith("| `/") or line.startswith("| root")]
    paths: set[str] = set()
    for row in rows:
        for tok in re.findall(r"`(/[^`]+)`", row):
            tok = (tok.replace("<type>/<rule>/<task>", "{type}/{rule}/{task}").replace("<t>", "{type}"))
            m = re.fullmatch(r"(.*?)\{([^{}]*,[^{}]*)\}(.*)", tok)
            if m:
                paths.update(m.group(1) + part.strip() + m.group(3) for part in m.group(2).split(","))
            else:
                paths.add(tok)
    return paths


def test_store_doc_table_lists_every_dataset_and_no_attribute_as_a_dataset():
    listed = _documented_paths()
    names = {"/" + f.name for f in schema_table(STATISTICS)}
    assert names - listed == set(), f"datasets missing from the docs/store.md table: {sorted(names - listed)}"
    groups = {"/" + "/".join(n.strip("/").split("/")[:k]) for n in names for k in range(1, n.count("/"))}
    unknown = listed - names - groups
    assert unknown == set(), f"docs/store.md rows that are not datasets of the schema: {sorted(unknown)}"
    assert "/critical/critical_p" not in listed and "/critical/{type}/{rule}/{task}/critical_p" not in listed


def test_every_array_carries_named_dims_and_p_and_layer_scales(tmp_path):
    path = _store(tmp_path / "s.h5")
    write_critical(path, Critical.from_items({"critical_p": 0.8, "type": "i", "rule": "topp", "task": "t"},
                                             {"per_expert_sparsity": np.zeros((2, 4)), "points/p": np.ones(3)}))
    table = schema_table(STATISTICS)
    rx = [(re.compile("^" + re.escape(f.name).replace(r"\{type\}", "[^/]+").replace(r"\{rule\}", "[^/]+")
                      .replace(r"\{task\}", "[^/]+") + "$"), f) for f in table]
    seen = 0
    with h5py.File(path) as f:
        def visit(name, obj):
            nonlocal seen
            if isinstance(obj, h5py.Dataset):
                spec = next(fl for r, fl in rx if r.match(name))
                assert [obj.dims[i].label for i in range(obj.ndim)] == [DIM_LABELS[d] for d in spec.dims], name
                seen += 1

        f.visititems(visit)
        mean = f["sparsity/i/mean"]
        assert [mean.dims[i].label for i in range(3)] == ["layer", "expert", "p"]
        np.testing.assert_array_equal(mean.dims[2][0][()], f["p_grid"][()])  # the p axis' coordinate
        np.testing.assert_array_equal(mean.dims[0][0][()], np.arange(2))  # the layer axis: /sites/layer
        assert f["critical/i/topp/t/per_expert_sparsity"].dims[1].label == "expert"
        assert f["critical/points/p"].dims[0].label == "point"
    assert seen > 30


def test_text_is_stored_as_str_and_lists_as_string_arrays_and_old_json_stores_still_read(tmp_path):
    path = _store(tmp_path / "s.h5")
    with h5py.File(path) as f:
        assert h5py.check_string_dtype(f["sites/kind"].dtype).encoding == "utf-8"
        assert list(f["sites/kind"].asstr()[()]) == ["routed", "routed"]
        assert list(f.attrs["types"]) == ["i"] and list(f.attrs["data_sources"]) == ["hand"]
    with open_store(path) as st:
        assert st.types == ["i"] and st.data_sources == ["hand"]
    with update_store(path) as f:  # how stores were written before: JSON text and fixed-length bytes
        f.attrs["types"] = json.dumps(["i"])
        f.attrs["data_sources"] = json.dumps(["a.txt", "b.txt"])
        del f["sites/kind"]
        f["sites/kind"] = np.array([b"moe", b"moe"])
    with open_store(path) as st:
        assert st.types == ["i"] and st.data_sources == ["a.txt", "b.txt"] and st.sites().kind == ["routed"] * 2


def test_to_dataframe_is_the_per_expert_table_of_the_typed_readers(tmp_path):
    path = _store(tmp_path / "s.h5")
    with open_store(path) as st:
        df = st.to_dataframe(type="i", p=0.9)
        every_p = st.to_dataframe(type="i", p=None)
        mean, tokens = st.sparsity("i").mean, st.routing().tokens
    assert len(df) == 8 and len(every_p) == 16
    for r in df.itertuples():
        assert r.tokens == COUNTS[r.row, r.expert]
        assert r.sparsity == pytest.approx(mean[r.row, r.expert, 1], nan_ok=True)
        assert r.dead == (tokens[r.row, r.expert] == 0)
        assert r.utilization == pytest.approx(COUNTS[r.row, r.expert] / COUNTS[r.row].mean())


def test_export_writes_the_same_table_as_csv_and_refuses_a_store_as_target(tmp_path, capsys):
    path = _store(tmp_path / "s.h5")
    assert main(["export", str(path), "--csv", str(tmp_path / "t.csv"), "--p", "0.5"]) == 0
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open_store(path) as st:
        want = st.expert_table("i", 0.5)
    assert [int(r["tokens"]) for r in rows] == want["tokens"]
    assert [float(r["sparsity"]) for r in rows] == pytest.approx(want["sparsity"], nan_ok=True)
    assert main(["export", str(path), "--parquet", str(tmp_path / "t.parquet"), "--p", "all"]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 16
    before = path.read_bytes()
    assert main(["export", str(path), "--csv", str(path)]) == 2
    assert main(["export", str(path)]) == 2
    assert main(["export", str(path), "--csv", str(tmp_path / "u.csv"), "--p", "1.5"]) == 2  # not a p
    err = capsys.readouterr().err
    assert "is a moeprof store" in err and "exactly one of --csv" in err and "--p 1.5 must lie in [0, 1]" in err
    assert path.read_bytes() == before and not (tmp_path / "u.csv").exists()


def test_output_folder_errors_name_a_flag_only_when_a_flag_named_the_path(tmp_path):
    from moeprof.atomic import OutputError, check_writable
    from moeprof.store import check_output

    with pytest.raises(OutputError) as api:
        check_writable(tmp_path / "missing" / "x.h5")  # the Python API (profile(), write_profile)
    assert "--out" not in str(api.value) and "choose another output path" in str(api.value)
    assert f"mkdir -p {tmp_path / 'missing'}" in str(api.value)
    with pytest.raises(OutputError, match="choose another -o$"):
        check_output(tmp_path / "missing" / "x.h5", flag="-o")


def test_a_store_missing_a_dataset_names_it_and_its_command(moe_ckpt, moe_text, tmp_path, capsys):
    out = profile_store(capsys, moe_ckpt, moe_text, tmp_path / "m.h5")
    with h5py.File(out, "r+") as f:
        del f["routing/tokens"]
    refused(capsys, "leaderboard", out, match="has no dataset 'routing/tokens'; the store is incomplete: `moeprof "
            "profile MODEL")
    with h5py.File(out, "r+") as f:  # plots read dead experts from /outliers/dead, not routing: take what they need
        del f["sparsity/i/mean"]
    refused(capsys, "plot", out, "-o", tmp_path / "plots", match="'sparsity/i/mean'")
    with h5py.File(out, "r+") as f:
        del f["p_grid"]
    refused(capsys, "info", out, match="has no dataset 'p_grid'")
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = "abc"
    refused(capsys, "info", out, match=f"{out} has schema_version 'abc'")


def test_export_off_the_grid_takes_the_nearest_grid_p_and_says_so(tmp_path, capsys):
    path = _store(tmp_path / "s.h5")
    with open_store(path) as st:
        grid = st.p_grid.tolist()
        want_p = min(grid, key=lambda g: abs(g - 0.8))  # by hand: the grid value closest to 0.8
        want = st.expert_table("i", want_p)
    assert 0.8 not in grid
    capsys.readouterr()
    assert main(["export", str(path), "--csv", str(tmp_path / "t.csv"), "--p", "0.8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"--p 0.8 is not on the profiled p-grid; using the nearest grid p {want_p:g}" in out
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["sparsity"]) for r in rows] == pytest.approx(want["sparsity"], nan_ok=True)


def _two_type_store(path):
    """2 layers × 4 experts, types i and x, grid (0.5, 0.9): every i vector is [1..8], every x vector [1]*8.
    By hand at p 0.9: i keeps 6 of 8 (8+7+6+5+4+3 = 33 ≥ 32.4) → sparsity 0.25; x keeps 8 of 8 (7.2 needs 8 ones)
    → 0.0."""
    import torch

    from moeprof.stats import ProfileStats, VectorSummary
    from moeprof.store import ProfileMeta, write_profile

    stats = ProfileStats(2, 4, (0.5, 0.9), ("i", "x"))
    for row in range(2):
        ids = torch.tensor([0, 1, 1, 3])
        stats.activations["i"].add(row, ids, VectorSummary.of(torch.arange(1.0, 9.0).repeat(4, 1), (0.5, 0.9)))
        stats.activations["x"].add(row, ids, VectorSummary.of(torch.ones(4, 8), (0.5, 0.9)))
        stats.routing.add(row, ids[:, None], torch.ones(4, 1, dtype=torch.float64))
    meta = ProfileMeta(model="hand/moe", model_type="test", architecture="Test", is_moe=True, top_k=1, hidden_size=8,
                       model_config={"model_type": "test"}, data_sources=["hand"], tokens=4, seq_len=4, batch_size=1,
                       dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[8, 8], site_kinds=["routed", "routed"])


def test_export_type_all_has_a_type_column_and_the_critical_and_tolerance_columns(tmp_path, capsys):
    path = _two_type_store(tmp_path / "s.h5")
    crit = np.arange(8, dtype=np.float64).reshape(2, 4) / 10  # per-expert sparsity at p*: 0.0 … 0.7
    write_critical(path, Critical({"critical_p": 0.8, "type": "i", "rule": "topp", "task": "t"},
                                  per_expert_sparsity=crit, tolerance_sparsity=crit + 0.05, tolerance_p=1 - crit))
    out = tmp_path / "t.csv"
    assert main(["export", str(path), "--csv", str(out), "--type", "all"]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:6] == ["row", "layer", "kind", "type", "expert", "p"]
    by_type = {t: [r for r in rows if r["type"] == t] for t in ("i", "x")}
    assert len(by_type["i"]) == len(by_type["x"]) == 8 and len(rows) == 16  # 2 layers × 4 experts per type
    live = lambda rs: [r for r in rs if int(r["tokens"]) > 0]  # noqa: E731
    assert {float(r["sparsity"]) for r in live(by_type["i"])} == {0.25}
    assert {float(r["sparsity"]) for r in live(by_type["x"])} == {0.0}
    for r in by_type["i"]:
        want = crit[int(r["row"]), int(r["expert"])]
        assert float(r["critical_sparsity"]) == pytest.approx(want)
        assert float(r["tolerance_sparsity"]) == pytest.approx(want + 0.05)
        assert float(r["tolerance_p"]) == pytest.approx(1 - want)
    assert all(math.isnan(float(r["critical_sparsity"])) for r in by_type["x"])  # no /critical of x


def test_export_replaces_its_own_table_without_force_but_not_another_file(tmp_path, capsys):
    path = _two_type_store(tmp_path / "s.h5")
    out = tmp_path / "t.csv"
    assert main(["export", str(path), "--csv", str(out)]) == 0
    assert main(["export", str(path), "--csv", str(out), "--type", "x"]) == 0  # its own table: replaced
    with open(out) as fh:
        assert {r["type"] for r in csv.DictReader(fh)} == {"x"}
    other = tmp_path / "notes.csv"
    other.write_text("name,value\nmine,1\n")
    assert main(["export", str(path), "--csv", str(other)]) == 2
    assert "exists and is not a table `moeprof export` wrote" in capsys.readouterr().err
    assert other.read_text() == "name,value\nmine,1\n"
    assert main(["export", str(path), "--csv", str(other), "--force"]) == 0


def test_to_dataframe_takes_all_as_every_p_and_refuses_other_words(tmp_path):
    from moeprof.store import StoreError

    with open_store(_store(tmp_path / "s.h5")) as st:
        assert len(st.to_dataframe(type="i", p="all")) == len(st.to_dataframe(type="i", p=None)) == 16
        with pytest.raises(StoreError, match="p = 'most' is not"):
            st.to_dataframe(type="i", p="most")


def test_export_into_a_folder_suggests_a_table_name_and_replaces_its_own_table(tmp_path, capsys):
    from conftest import refused

    path = _store(tmp_path / "s.h5")
    (tmp_path / "adir").mkdir()
    err = refused(capsys, "export", path, "--csv", tmp_path / "adir", match="is a folder")
    assert "profile.h5" not in err and "experts.csv" in err
    err = refused(capsys, "export", path, "--parquet", tmp_path / "adir", match="is a folder")
    assert "experts.parquet" in err
    for flag, name in (("--csv", "t.csv"), ("--parquet", "t.parquet")):
        assert main(["export", str(path), flag, str(tmp_path / name), "--p", "0.5"]) == 0
        assert main(["export", str(path), flag, str(tmp_path / name), "--p", "0.9"]) == 0, capsys.readouterr().err
    (tmp_path / "data.csv").write_text("my,own\n1,2\n")
    refused(capsys, "export", path, "--csv", tmp_path / "data.csv", match="is not a table `moeprof export` wrote")
