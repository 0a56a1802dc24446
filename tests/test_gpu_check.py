"""benchmarks/gpu/check.sh: its dry run (the CPU, tiny shapes, Triton's interpreter) runs every item and writes the
JSON and the summary; without a GPU the real check fails loudly instead of skipping."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "check.sh"
ITEMS = ("a_exactness", "b_speed", "c_capture", "d_torchrun", "e_decode")


def _run(args, tmp_path, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHON=sys.executable, HF_HOME=str(tmp_path / "hf"), **env))


def test_gpu_check_dry_run_runs_every_item_and_writes_json_and_summary(tmp_path):
    out = tmp_path / "check"
    proc = _run(["--dry-run", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "check.json").read_text())
    assert result["mode"] == "dry-run" and result["ok"] is True
    assert tuple(result["sections"]) == ITEMS
    for name in ITEMS:
        assert result["sections"][name]["ok"] is True, (name, result["sections"][name])
    a = result["sections"]["a_exactness"]["cases"]
    assert {c["dtype"] for c in a} == {"fp32", "bf16"} and {c["type"] for c in a} == {"i", "x"}
    speed = result["sections"]["b_speed"]["rows"]
    assert {r["regime"] for r in speed} == {"decode", "prefill"}
    for r in speed:  # the ideal is the one of the realized sparsity
        s = r["sparsity_realized"]
        assert abs(r["ideal"] - (1 / (1 - s / 3) if r["type"] == "i" else 1 / (1 - 2 * s / 3))) < 2e-3
    torchrun = result["sections"]["d_torchrun"]
    assert torchrun["datasets_compared"] > 10 and torchrun["datasets_differing"] == []
    assert {r["model"] for r in result["sections"]["e_decode"]["rows"]} == {"tiny-moe", "qwen3-30b-a3b-shape"}
    summary = (out / "summary.txt").read_text()
    assert "overall: PASS" in summary and all(name in summary for name in ITEMS)


def test_gpu_check_without_a_gpu_fails_loudly_instead_of_skipping(tmp_path):
    proc = _run(["--out", str(tmp_path / "none")], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no CUDA device")
    assert not (tmp_path / "none" / "check.json").exists()
