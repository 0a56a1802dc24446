"""Let the stock `lm_eval --model moeprof …` find moeprof's model type: a one-shot import hook, near-free elsewhere.

Why a hook at all — lm-eval 0.4.13 has no hook-free way in:
- `lm_eval.api.registry.get_model(name)` looks `name` up only in `model_registry`, filled by
  `lm_eval/models/__init__.py::_register_all_models` from its fixed `MODEL_MAPPING`; nothing else fills it.
- The registry accepts lazy ``"module:attr"`` strings and `EntryPoint`s as values (`_materialise_placeholder`),
  but nothing in lm-eval 0.4.13 ever reads an entry-point group (`importlib.metadata.entry_points` is called
  nowhere; EleutherAI/lm-evaluation-harness#3282 asks for it), `--model` takes only a registered name, and
  there is no plugin environment variable (``--include_path`` adds task folders, not models).
So the unchanged `lm_eval` command sees "moeprof" only if code runs in its process before the lookup, and the
only code an installed package can run there is a ``.pth`` line at interpreter start.

What runs at interpreter start, in every Python process of the environment: the installed ``.pth`` line
``import _moeprof_lm_eval_hook`` imports THIS file, copied by setup.py to the root of site-packages as the
top-level module `_moeprof_lm_eval_hook` (the ``moeprof`` package itself is not imported: no
``moeprof/__init__``, no torch). It defines two small classes and inserts one finder in `sys.meta_path` that
answers only for ``lm_eval.models``; every other import costs it one string comparison. Measured in a venv
with moeprof installed (Python 3.11, shared 2-core machine): `python -X importtime -c pass` shows 0.15 ms for
importing this module (median of 21); `python -c pass` takes 21.1 ms with the .pth and 20.8 ms without it
(medians of 60 interleaved runs: the difference is within the noise).

When (and only when) ``lm_eval.models`` is first imported, the finder removes itself from `sys.meta_path` and
registers "moeprof" right after lm-eval's own models as the lazy placeholder
``"moeprof.evaluate.lm_eval_model:MoeprofLM"``, so moeprof, torch and transformers are imported only when
lm-eval asks for that model. A process that never imports lm-eval registers nothing and imports nothing else.

Without the ``.pth`` file use ``python -m moeprof.evaluate …`` (the same arguments), or import
`moeprof.evaluate.lm_eval_model` before calling `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import sys

MODEL_NAME = "moeprof"
TARGET = "moeprof.evaluate.lm_eval_model:MoeprofLM"
_WATCHED = "lm_eval.models"
# What an install ships (setup.py runs this file for them): the .pth line imports this file under HOOK_MODULE.
PTH_NAME = "moeprof-lm-eval.pth"
HOOK_MODULE = "_moeprof_lm_eval_hook"
PTH_LINE = f"import {HOOK_MODULE}\n"


def register_placeholder() -> None:
    """Register "moeprof" in lm-eval's model registry as a lazy placeholder (no-op if it is already there)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfter:  # a loader (duck-typed: importlib.abc costs ~15 ms at every interpreter start)
    """Delegates to the real loader of `lm_eval.models`, then registers the placeholder."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_placeholder()

    def __getattr__(self, name):  # get_code, get_source, is_package … stay the real loader's
        return getattr(self._loader, name)


class MoeprofLmEvalFinder:  # a meta-path finder; the name is how a second copy of this file recognizes it
    """Answers only for `lm_eval.models`, once: wraps its real loader so "moeprof" is registered after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # one shot: the real spec is found by the rest of the path
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


def install() -> None:
    """Register now if `lm_eval.models` is already imported, else hook its first import (once per process)."""
    if _WATCHED in sys.modules:
        register_placeholder()
    elif not any(type(f).__name__ == MoeprofLmEvalFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, MoeprofLmEvalFinder())


def write_site_files(folder) -> list:
    """Write what an install ships into site-packages folder `folder`: the .pth line and this file as the hook.

    Returns the two paths written. setup.py calls this function (run from this file) for wheels and editable
    installs.
    """
    from pathlib import Path

    folder = Path(folder)
    hook = folder / f"{HOOK_MODULE}.py"
    hook.write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    pth = folder / PTH_NAME
    pth.write_text(PTH_LINE, encoding="utf-8")
    return [pth, hook]


# setup.py runs this file under BUILD_NAME to reuse PTH_NAME / write_site_files: a build process is not hooked.
BUILD_NAME = "_moeprof_lm_eval_build"
if __name__ != BUILD_NAME:
    install()
