"""A store knows when it is damaged: fletcher32 checksums on every array it writes, and shape, range and
consistency checks on read, each refusal naming the file and the dataset (never a silently wrong number)."""

import h5py
import numpy as np
import pytest
from conftest import hand_store, refused

from moeprof.store import StoreError, open_store


def _datasets(path) -> dict:
    """Return {name: (ndim, dtype kind, fletcher32)} of every dataset in the file."""
    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = (obj.ndim, obj.dtype.kind, obj.fletcher32)

    with h5py.File(path) as f:
        f.visititems(visit)
    return found


def _flip_byte_in(path, name: str) -> None:
    """Flip one bit of the first stored byte of dataset `name` (its first chunk)."""
    with h5py.File(path) as f:
        ds = f[name]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_array_of_numbers_is_written_with_a_fletcher32_checksum(tmp_path):
    found = _datasets(hand_store(tmp_path / "s.h5"))
    numeric = {n: v for n, v in found.items() if v[0] > 0 and v[1] in "biuf"}
    assert "sparsity/i/mean" in numeric and "routing/tokens" in numeric
    assert [n for n, v in numeric.items() if not v[2]] == []


def test_a_store_written_without_checksums_still_reads(tmp_path, monkeypatch):
    import moeprof.schema

    monkeypatch.setattr(moeprof.schema, "checksummed", lambda arr: False)
    path = hand_store(tmp_path / "old.h5")
    assert not any(v[2] for v in _datasets(path).values())
    with open_store(path) as st:
        assert st.mean("i").shape == (2, 4, 2) and st.routing().tokens.sum() == 8


def test_a_flipped_byte_in_a_dataset_is_damage_naming_the_dataset(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    _flip_byte_in(path, "sparsity/i/mean")
    err = refused(capsys, "leaderboard", path, "--p", "0.5", match=f"{path} is damaged: dataset /sparsity/i/mean")
    assert "checksum" in err and "not a moeprof store" not in err
    with open_store(path) as st, pytest.raises(StoreError, match="checksum"):
        st.mean("i")


def test_a_damaged_format_mark_is_damage_not_another_kind_of_file(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    data = path.read_bytes()
    at = data.index(b"moeprof-profile")
    path.write_bytes(data[:at] + b"moeprog" + data[at + 7:])
    refused(capsys, "info", path, match=f"{path} is damaged: it holds a moeprof store's root attributes, but its "
            "root attribute 'format' reads 'moeprog-profile'")


def test_a_sparsity_outside_0_1_is_refused_naming_the_dataset(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:  # one float changed by hand (HDF5 recomputes the checksum)
        f["sparsity/i/mean"][0, 0, 0] = 7.5
    refused(capsys, "leaderboard", path, "--p", "0.5",
            match="dataset /sparsity/i/mean: holds 7.5, outside [0, 1]")
    refused(capsys, "plot", path, "-o", tmp_path / "plots", match="dataset /sparsity/i/mean: holds 7.5")


def test_a_mean_that_disagrees_with_sum_over_vectors_is_refused(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        mean = f["sparsity/i/mean"][()]
        f["sparsity/i/mean"][1, 1, 1] = mean[1, 1, 1] * 0.5  # still a sparsity, but not the stored sum / vectors
    refused(capsys, "leaderboard", path, "--p", "0.9", match="dataset /sparsity/i/mean: disagrees with sum / vectors "
            f"at [layer 1, expert 1, p index 1]: {float(mean[1, 1, 1]) * 0.5!r} vs {float(mean[1, 1, 1])!r}")


def test_num_experts_that_disagrees_with_the_arrays_is_refused_naming_a_dataset(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["num_experts"] = 32
    err = refused(capsys, "leaderboard", path, "--p", "0.5", match=f"{path} is damaged: dataset /")
    assert "(2, 4), but the store's root attributes and p-grid make [layers, experts" in " ".join(err.split())
    assert "broadcast" not in err


def test_a_wrong_shaped_dataset_is_refused_naming_it(tmp_path, capsys):
    path = hand_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f["routing/tokens"]
        f["routing/tokens"] = np.ones((2, 3), dtype=np.int64)
    refused(capsys, "leaderboard", path, "--p", "0.5",
            match="dataset /routing/tokens: its shape is (2, 3), but the store's root attributes and p-grid make "
                  "[layers, experts] = (2, 4)")
