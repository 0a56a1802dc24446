"""moeprof.recipes: the one recipe reader — shipped recipes load, every mistake is one line naming file and fix."""

from pathlib import Path

import pytest

from moeprof.recipes import RecipeError, load_profile_recipe, load_training_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["qwen3-30b-a3b.toml", "smollm2-135m.toml"])
def test_shipped_profile_recipes_load(name):
    assert load_profile_recipe(RECIPES / name)["model"]


@pytest.mark.parametrize("name", ["train-tiny-moe.toml", "train-tiny-dense.toml"])
def test_shipped_training_recipes_load(name):
    raw = load_training_recipe(RECIPES / name)
    assert raw["model"]["architecture"].startswith("Qwen3") and raw["train"]["steps"] > 0


@pytest.mark.parametrize("text, match", [
    (None, "does not exist"),
    ("model = \n", "not valid TOML"),
    ('model = "x"\nmodle_typo = 1\n', r"unknown keys \['modle_typo'\]"),
    ('model = "x"\nseq_len = "256"\n', "seq_len must be an integer"),
    ('model = "x"\nmax_tokens = true\n', "max_tokens must be an integer"),
    ('model = "x"\nconfig = 3\n', "config must be a table"),
])
def test_profile_recipe_mistakes_are_one_line_errors_naming_the_file(tmp_path, text, match):
    path = tmp_path / "r.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError, match=match) as info:
        load_profile_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("edit, match", [
    (("[tokenizer]", "[tokeniser]"), r"unknown keys \['tokeniser'\]"),
    (("steps = 1000", "steps = 6.5"), "steps must be an integer"),
    (("lr = 3e-3", 'lr = "fast"'), "lr must be a number"),
    (("batch_size = 16", "batch_size = 16\nbatchsize = 8"), r"\[train\] has unknown keys \['batchsize'\]"),
    (('corpus = "domains"', "# no corpus"), r"\[data\] lacks \['corpus'\]"),
])
def test_training_recipe_mistakes_are_one_line_errors(tmp_path, edit, match):
    path = tmp_path / "t.toml"
    path.write_text((RECIPES / "train-tiny-moe.toml").read_text().replace(*edit))
    with pytest.raises(RecipeError, match=match):
        load_training_recipe(path)
