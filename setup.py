"""Ships the lm-eval hook at the root of site-packages so the unchanged `lm_eval --model moeprof` works.

lm-eval 0.4.13 finds models only in its own registry (no entry points; the reasons, with the lm-eval functions,
are in `moeprof/evaluate/lm_eval_plugin.py`). An install therefore ships two files at the root of
site-packages: `moeprof-lm-eval.pth` holding the line `import _moeprof_lm_eval_hook`, and
`_moeprof_lm_eval_hook.py`, a copy of `moeprof/evaluate/lm_eval_plugin.py` (self-contained: it imports only
`sys`, never the moeprof package). Interpreter start pays for that one small module; "moeprof" is registered
only in processes that import lm-eval. An editable install copies the hook at install time: reinstall after
changing lm_eval_plugin.py. Everything else about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# The same names as PTH_NAME / HOOK_MODULE in lm_eval_plugin.py (tests/test_evaluate_lm_eval.py checks it).
PTH_NAME = "moeprof-lm-eval.pth"
HOOK_MODULE = "_moeprof_lm_eval_hook"
HOOK_SOURCE = Path(__file__).resolve().parent / "moeprof" / "evaluate" / "lm_eval_plugin.py"


def write_site_files(folder: Path) -> list[str]:
    """Write the .pth line and the hook module into `folder` (the root of site-packages once installed)."""
    shutil.copyfile(HOOK_SOURCE, Path(folder) / f"{HOOK_MODULE}.py")
    Path(folder, PTH_NAME).write_text(f"import {HOOK_MODULE}\n")
    return [str(Path(folder) / PTH_NAME), str(Path(folder) / f"{HOOK_MODULE}.py")]


class build_py_with_hook(build_py):
    def run(self):
        super().run()
        write_site_files(Path(self.build_lib))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME),
                str(Path(self.build_lib) / f"{HOOK_MODULE}.py")]


class editable_wheel_with_hook(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        # `installation_dir` is the unpacked editable wheel: files here land at the root of site-packages
        super()._install_namespaces(installation_dir, pth_prefix)
        write_site_files(Path(installation_dir))


setup(cmdclass={"build_py": build_py_with_hook, "editable_wheel": editable_wheel_with_hook})
