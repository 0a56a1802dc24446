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
    domains = ["code", "owt", "wikipedia"]
    parts = {m: [f"{m}-{d}.h5" for d in domains] for m in ("tiny-moe", "tiny-dense")}
    assert names == sorted(["curves_tiny-moe_vs_tiny-dense.png", "tiny-dense.h5", "tiny-moe.h5",
                            "tiny-moe_heatmap_i_p0.9.png", "tiny-moe_load_by_text.png", "report.html",
                            *parts["tiny-moe"], *parts["tiny-dense"]])
    per_domain = {}
    for model, files in parts.items():  # each domain alone, then merged exactly into <model>.h5
        per_domain[model] = []
        for name in files:
            with h5py.File(out / name) as f:
                assert list(f.attrs["data_sources"]) == [name.removeprefix(model + "-").removesuffix(".h5") + ":heldout"]
                per_domain[model].append(f["routing/tokens"][()])
    from moeprof.outliers import routing_mutual_information

    mi = routing_mutual_information(np.stack(per_domain["tiny-moe"]))["mi_bits"]
    assert f"MI(domain; expert) per layer [{', '.join(f'{v:.3f}' for v in mi)}] bits" in stdout
    for name, experts in (("tiny-moe.h5", 16), ("tiny-dense.h5", 1)):
        with h5py.File(out / name) as f:
            assert f.attrs["schema_version"] >= 1 and "tiny" in f.attrs["model"]
            tokens = f["routing/tokens"][()]
            assert tokens.shape == (4, experts) and tokens.dtype == np.int64
            top_k = 2 if experts > 1 else 1
            np.testing.assert_array_equal(tokens, sum(per_domain[name.removesuffix(".h5")]))
            assert 3 * 256 <= tokens.sum(-1)[0] / top_k <= 2048
            for t in "xugi":
                assert f[f"sparsity/{t}/mean"].shape == (4, experts, len(f["p_grid"]))
            assert 0.5 <= f["critical"].attrs["critical_p"] < 1.0  # tiny models do tolerate some sparsity
            assert f["critical/per_expert_sparsity"].shape == (4, experts)
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # a real picture, not a blank canvas
    # the study's page (`moeprof report` on the demo's stores) works in a real browser: load by text of the three
    # domains, the two models compared, the critical searches
    from moeprof.report.browser import Browser
    from moeprof.report.html import embedded_data

    data = embedded_data((out / "report.html").read_text())
    assert data["texts"][0]["texts"] == ["wikipedia:heldout", "owt:heldout", "code:heldout"]
    assert len(data["compare"]["rows"]) == 5 and data["stores"][0]["criticals"]
    with Browser() as b:
        page = b.open(out / "report.html", timeout_s=120)
        assert page.errors == []
        assert page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)") == [
            "summary", "leaderboard", "heatmap", "curves", "layers", "critical", "texts", "compare"]
        assert page.evaluate("document.getElementById('heatmap').dataset.cells") == str(4 * 16)
