"""The startup hook: registers the plugin architectures the moment `GANDLF.models` is imported.

GaNDLF 0.1.5 has no extension point, and `GANDLF.configuration.model_config` freezes the allowed architecture
names the first time it is imported, right after `GANDLF.models`. `gandlf_dimlift_hook.pth` (at the
site-packages root) imports `gandlf_dimlift` at interpreter start-up, whose `__init__` calls `install()`: it
puts a one-shot finder on `sys.meta_path`
that wraps the loader of `GANDLF.models`, so `gandlf_dimlift.registry.register()` runs as soon as that module
has executed, before anything can read its model dictionary.

This module runs in every Python process of the environment: it imports nothing but `os` and `sys`, never
raises, and `GANDLF_DIMLIFT_DISABLE=1` turns it off. Registration failures become one line on stderr.
"""

import os
import sys

TARGET = "GANDLF.models"
DISABLE_VARIABLE = "GANDLF_DIMLIFT_DISABLE"


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def register_after_import() -> None:
    """Runs registration; any failure is one warning line, and GaNDLF keeps working without the plugin."""
    try:
        from gandlf_dimlift.registry import register

        register()
    except Exception as error:  # noqa: BLE001 - the hook must never break GaNDLF
        message = " ".join(f"{type(error).__name__}: {error}".split())
        sys.stderr.write(f"gandlf-dimlift: WARNING: plugin architectures not registered: {message}\n")


class _RegisteringLoader:
    """Delegates to GaNDLF's own loader and registers once `GANDLF.models` has executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register_after_import()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class GandlfModelsFinder:
    """A one-shot meta path finder for `GANDLF.models`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        uninstall()
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        except Exception:  # noqa: BLE001
            return None
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def installed() -> bool:
    return any(isinstance(finder, GandlfModelsFinder) for finder in sys.meta_path)


def install() -> None:
    """Arms the hook (idempotent). If GaNDLF's models are already imported, registers at once."""
    if disabled() or installed():
        return
    if TARGET in sys.modules:
        register_after_import()
        return
    sys.meta_path.insert(0, GandlfModelsFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, GandlfModelsFinder)]
