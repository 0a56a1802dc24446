"""Ships the lm-eval hook at the root of site-packages so the unchanged `lm_eval --model moeprof` works.

lm-eval 0.4.13 finds models only in its own registry (no entry points; the reasons, with the lm-eval functions,
are in `moeprof/evaluate/lm_eval_plugin.py`). An install therefore ships two files at the root of
site-packages: `moeprof-lm-eval.pth` holding the line `import _moeprof_lm_eval_hook`, and
`_moeprof_lm_eval_hook.py`, a copy of `moeprof/evaluate/lm_eval_plugin.py` (self-contained: it imports only
`sys`, never the moeprof package), both written by that file's own `write_site_files`. Interpreter start pays for that one small module; "moeprof" is registered
only in processes that import lm-eval. An editable install copies the hook at install time: reinstall after
changing lm_eval_plugin.py. Everything else about the package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# One source for what an install ships: the plugin file's own PTH_NAME, HOOK_MODULE and write_site_files. It is
# run here, not imported (importing moeprof would need torch at build time); it imports only sys, and under
# BUILD_NAME it defines its names without hooking this process.
HOOK_SOURCE = Path(__file__).resolve().parent / "moeprof" / "evaluate" / "lm_eval_plugin.py"
_plugin = {"__name__": "_moeprof_lm_eval_build", "__file__": str(HOOK_SOURCE)}
exec(compile(HOOK_SOURCE.read_text(encoding="utf-8"), str(HOOK_SOURCE), "exec"), _plugin)
assert _plugin["BUILD_NAME"] == _plugin["__name__"]
PTH_NAME, HOOK_MODULE, write_site_files = _plugin["PTH_NAME"], _plugin["HOOK_MODULE"], _plugin["write_site_files"]


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
