"""Let stock `lm_eval --model moeprof …` find moeprof's model type, for installs that ship a `.pth` hook.

lm-eval 0.4.13 looks model names up only in its own registry, filled when `lm_eval.models` is imported; it does
not read the ``lm_eval.models`` entry-point group (EleutherAI/lm-evaluation-harness#3282 asks for plugins; the
``--include_package`` flag of PR #3672 is not in 0.4.13). The only way to make the unchanged `lm_eval` command
see "moeprof" is code that runs at interpreter start: a one-line ``.pth`` file in site-packages,

    import moeprof.evaluate.lm_eval_plugin

which installs a one-shot import hook: when — and only when — `lm_eval.models` is imported, the name "moeprof" is
registered right after it as a lazy "module:attr" placeholder, so nothing heavy is imported until lm-eval asks for
that model. Processes that never import lm-eval pay for importing this small module only.

Without the `.pth` file use `python -m moeprof.evaluate …` (the same arguments), or import
`moeprof.evaluate.lm_eval_model` before calling `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import sys

MODEL_NAME = "moeprof"
TARGET = "moeprof.evaluate.lm_eval_model:MoeprofLM"
_WATCHED = "lm_eval.models"


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


class _Finder:  # a meta-path finder
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
    """Register now if `lm_eval.models` is already imported, else hook its first import."""
    if _WATCHED in sys.modules:
        register_placeholder()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
