"""`moeprof profile` + `leaderboard` on saved tiny random checkpoints of five MoE families (the issue's done-when)."""

import json

import h5py
import pytest
from conftest import save_tiny_checkpoint, tiny_tokenizer
from moe_families import build

from moeprof.cli import main

TEXT = ("Routed experts see only the tokens the router sends them; shared experts see every token. ") * 40

# family → the site kinds its 2-layer tiny config has, in row order
EXPECTED_KINDS = {
    "mixtral": ["routed", "routed"],
    "olmoe": ["routed", "routed"],
    "qwen2_moe": ["dense", "routed", "shared"],  # mlp_only_layers = [0]
    "deepseek_v3": ["dense", "routed", "shared"],  # first_k_dense_replace = 1
    "gpt_oss": ["routed", "routed"],
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i * 150:(i + 1) * 150 + 300]}) for i in range(12)))
    return path


@pytest.mark.parametrize("family", sorted(EXPECTED_KINDS))
def test_profile_and_leaderboard_of_a_saved_tiny_checkpoint(family, data_file, tmp_path, capsys):
    tok = tiny_tokenizer()
    model = build(family, vocab_size=len(tok))
    folder = save_tiny_checkpoint(tmp_path / family, model=model, tokenizer=tok)
    out = tmp_path / "run.h5"
    code = main(["profile", str(folder), "--data", str(data_file), "--out", str(out), "--seq-len", "16",
                 "--max-tokens", "64", "--batch-size", "2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    kinds = EXPECTED_KINDS[family]
    with h5py.File(out) as f:
        assert [k.decode() for k in f["sites/kind"][()]] == kinds
        tokens = f["routing/tokens"][()]  # [rows, E]
        layers = f["sites/layer"][()].tolist()
        router = json.loads(f.attrs["router"])
    cfg = model.config
    assert router["top_k"] == cfg.num_experts_per_tok
    assert router["routed_scaling_factor"] == float(getattr(cfg, "routed_scaling_factor", None) or 1.0)
    if family == "deepseek_v3":  # sigmoid scores with a correction bias, renormalized top-k
        assert router["scoring"] == "sigmoid" and router["renormalized"] is cfg.norm_topk_prob
    assert layers == sorted(layers) and layers[-1] == 1
    k = model.config.num_experts_per_tok
    for row, kind in enumerate(kinds):
        assert tokens[row].sum() == 64 * (k if kind == "routed" else 1)  # each (token, expert) pair once
        if kind != "routed":
            assert tokens[row, 1:].sum() == 0
    assert main(["leaderboard", str(out), "--top", "50"]) == 0
    shown = capsys.readouterr().out
    for row, kind in enumerate(kinds):
        if kind == "shared":
            assert f"{layers[row]} shared" in shown
    if "shared" in kinds:  # --layer names the decoder layer: all its sites, routed and shared
        from moeprof.report.leaderboard import leaderboard_rows
        from moeprof.store import open_store

        last = layers[-1]
        with open_store(out) as st:
            rows = {r["layer"] for r in leaderboard_rows(st, layer=last, top=None)}
        assert rows == {r for r, l in enumerate(layers) if l == last} and len(rows) == 2
        assert main(["leaderboard", str(out), "--layer", str(last)]) == 0
        shown = capsys.readouterr().out
        assert f"{last} shared" in shown and f"layer {last}" in shown


def test_unknown_model_type_lists_the_supported_families(tmp_path, capsys):
    from moeprof.models import ModelLoadError, config_from_recipe

    with pytest.raises(ModelLoadError, match="moeprof supports model_type .*qwen3_moe"):
        config_from_recipe({"model": "x", "config": {"model_type": "made_up_moe"}})
