"""`moeprof demo` end to end on the embedded models: files promised, store contract, images, critical group."""

import h5py
import numpy as np
from PIL import Image

from moeprof.cli import main

pytestmark = __import__("pytest").mark.slow


def test_demo_writes_stores_plots_and_critical_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-tokens", "2048"]) == 0
    stdout = " ".join(capsys.readouterr().out.split())
    assert "critical p =" in stdout and "by sparsity" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves_tiny-moe_vs_tiny-dense.png", "tiny-dense.h5", "tiny-moe.h5",
                     "tiny-moe_heatmap_i_p0.9.png"]
    for name, experts in (("tiny-moe.h5", 8), ("tiny-dense.h5", 1)):
        with h5py.File(out / name) as f:
            assert f.attrs["schema_version"] >= 1 and "tiny" in f.attrs["model"]
            tokens = f["routing/tokens"][()]
            assert tokens.shape == (4, experts) and tokens.dtype == np.int64
            top_k = 2 if experts == 8 else 1
            assert (tokens.sum(-1) == 2048 * top_k).all()
            for t in "xugi":
                assert f[f"sparsity/{t}/mean"].shape == (4, experts, len(f["p_grid"]))
            assert 0.5 <= f["critical"].attrs["critical_p"] < 1.0  # tiny models do tolerate some sparsity
            assert f["critical/per_expert_sparsity"].shape == (4, experts)
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # a real picture, not a blank canvas
