"""A store names routed experts "routed" whatever the caller calls them: moeprof.arch's Site.kind "moe" is
canonicalized on write, and a kind outside the schema's vocabulary is refused."""

from __future__ import annotations

import pytest

from moeprof.arch.base import ROUTED
from moeprof.stats import ProfileStats
from moeprof.store import ProfileMeta, open_store, write_profile


def _write(path, kinds):
    stats = ProfileStats(len(kinds), 2, (0.9,), ("i",))
    meta = ProfileMeta(model="m", model_type="test", architecture="Test", is_moe=True, top_k=1, hidden_size=4,
                       model_config={}, data_sources=["random"], tokens=0, seq_len=4, batch_size=1,
                       dtype="float32", device="cpu")
    return write_profile(path, stats, meta, intermediate_sizes=[2] * len(kinds), site_kinds=kinds)


def test_write_profile_stores_site_kind_moe_as_routed(tmp_path):
    _write(tmp_path / "s.h5", [ROUTED, "shared", "dense"])
    with open_store(tmp_path / "s.h5") as st:
        assert [k.decode() for k in st.file["sites/kind"][()]] == ["routed", "shared", "dense"]
        assert st.sites().kind == ["routed", "shared", "dense"]


def test_write_profile_refuses_an_unknown_site_kind(tmp_path):
    with pytest.raises(ValueError, match="'expert'.*routed, shared, dense"):
        _write(tmp_path / "s.h5", ["routed", "expert"])
    assert not (tmp_path / "s.h5").exists()
