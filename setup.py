"""Ships `moeprof-lm-eval.pth` at the root of site-packages so the unchanged `lm_eval --model moeprof` works.

lm-eval 0.4.13 finds models only in its own registry (no entry points); the one-line .pth imports
`moeprof.evaluate.lm_eval_plugin`, which registers "moeprof" right after lm-eval loads its models — and does
nothing in processes that never import lm-eval. Everything else about the package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "moeprof-lm-eval.pth"
PTH_LINE = "import moeprof.evaluate.lm_eval_plugin\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / PTH_NAME
        target.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]


class editable_wheel_with_pth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        # `installation_dir` is the unpacked editable wheel: files here land at the root of site-packages
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
