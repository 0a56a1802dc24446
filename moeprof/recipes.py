"""Recipes: the one reader and validator of moeprof's TOML run files (``recipes/*.toml``).

Two kinds, told apart by who asks, not by the file name:
- a profile recipe (`load_profile_recipe`): flat keys for ``moeprof profile`` (model, data, p_grid, …) and an
  optional ``[config]`` table that `moeprof.models.config_from_recipe` turns into a transformers config;
- a training recipe (`load_training_recipe`): the sections ``[data]``, ``[tokenizer]``, ``[model]``, ``[train]``
  of an embedded model (`moeprof.embedded.train`).

Every problem is one `RecipeError` line naming the file and the fix: missing file, bad TOML, unknown key, wrong
value type. What the values mean (is this corpus known, is this architecture supported) stays with the user.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError


class RecipeError(MoeprofError, ValueError):
    """A recipe file that cannot be used as written (the message names the file and the fix)."""


_NUMBER = (int, float)
_TYPE_WORDS = {int: "an integer", str: "a string", list: "a list", dict: "a table"}
# key -> accepted types (bool is excluded from int explicitly: TOML true is a Python int subclass)
PROFILE_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,), "data": (str, list), "p_grid": (list,), "types": (str, list), "max_tokens": (int,),
    "seq_len": (int,), "batch_size": (int,), "dtype": (str,), "device": (str,), "trace_tokens": (int,),
    "out": (str,), "config": (dict,), "description": (str,),
}
PROFILE_ITEMS: dict[str, tuple[type, ...]] = {"data": (str,), "types": (str,), "p_grid": _NUMBER}  # list items
TRAINING_SECTIONS: dict[str, dict[str, tuple[type, ...]] | None] = {  # None: any keys (transformers config)
    "data": {"corpus": (str,), "seq_len": (int,), "order": (str,)},
    "tokenizer": {"vocab_size": (int,), "min_frequency": (int,)},
    "model": None,
    "train": {"steps": (int,), "batch_size": (int,), "lr": _NUMBER, "warmup_steps": (int,),
              "min_lr_frac": _NUMBER, "weight_decay": _NUMBER, "grad_clip": _NUMBER, "eval_every": (int,),
              "log_every": (int,), "threads": (int,), "experts_implementation": (str,)},
}
TRAINING_TOP_KEYS: dict[str, tuple[type, ...]] = {"name": (str,), "seed": (int,)}
TRAINING_REQUIRED = {"name": None, "data": ("corpus", "seq_len"), "tokenizer": ("vocab_size",),
                     "model": ("architecture",), "train": ("steps", "batch_size", "lr")}


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Return the TOML file at `path` as a dict (RecipeError for a missing file or invalid TOML)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; see recipes/ for ready ones")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None


def _check(path: Path, where: str, values: dict, allowed: dict[str, tuple[type, ...]]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RecipeError(f"recipe {path}{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    for key, value in values.items():
        types = allowed[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = "a number" if float in types else " or ".join(_TYPE_WORDS[t] for t in types)
            raise RecipeError(f"recipe {path}{where}: {key} must be {want}, got {value!r}; fix the file")


def load_profile_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Return a validated profile recipe as a dict of its keys (see PROFILE_KEYS; every key optional)."""
    raw = read_toml(path)
    _check(Path(path), "", raw, PROFILE_KEYS)
    for key, types in PROFILE_ITEMS.items():
        value = raw.get(key)
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, types)] if isinstance(value, list) else []
        if bad or value == []:
            want = "numbers" if float in types else "strings"
            raise RecipeError(f"recipe {path}: {key} must be a non-empty list of {want}, got {value!r}; fix the file")
    return raw


def load_training_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Return a validated training recipe: {"name", "seed"?, "data", "tokenizer", "model", "train"} tables."""
    path = Path(path)
    raw = read_toml(path)
    tables = {k: v for k, v in raw.items() if k in TRAINING_SECTIONS}
    _check(path, "", {k: v for k, v in raw.items() if k not in TRAINING_SECTIONS}, TRAINING_TOP_KEYS)
    for section, allowed in TRAINING_SECTIONS.items():
        table = tables.get(section)
        if not isinstance(table, dict):
            raise RecipeError(f"recipe {path} has no [{section}] table; add it (see recipes/train-tiny-moe.toml)")
        if allowed is not None:
            _check(path, f" [{section}]", table, allowed)
    for section, keys in TRAINING_REQUIRED.items():
        if keys is None:
            if section not in raw:
                raise RecipeError(f"recipe {path} has no {section} key; add one")
            continue
        missing = [k for k in keys if k not in raw[section]]
        if missing:
            raise RecipeError(f"recipe {path} [{section}] lacks {missing}; add them")
    return raw
