"""Places the startup hook `gandlf_dimlift_hook.pth` at the site-packages root, for wheels and editable installs.

Metadata lives in setup.cfg; this file only adds the two build steps setuptools has no declarative form for.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "gandlf_dimlift_hook.pth"


class BuildPyWithHook(build_py):
    """Copies the .pth to the root of build_lib, which becomes the wheel's (and site-packages') root."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH.name)]


class EditableWheelWithHook(editable_wheel):
    """Adds the .pth to the editable wheel's root; setuptools writes its own namespace .pth files there too."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        self.copy_file(str(PTH), str(Path(installation_dir) / PTH.name))


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
