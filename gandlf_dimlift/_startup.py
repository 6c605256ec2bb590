"""The startup hook: registers the plugin architectures the moment `GANDLF.models` is imported.

GaNDLF 0.1.5 has no extension point, and `GANDLF.configuration.model_config` freezes the allowed architecture
names the first time it is imported, right after `GANDLF.models`. `gandlf_dimlift_hook.pth` (at the
site-packages root) imports `gandlf_dimlift` at interpreter start-up, whose `__init__` calls `install()`: it
puts a finder on `sys.meta_path` that wraps the loader of `GANDLF.models`, so `gandlf_dimlift.registry.register()`
runs as soon as that module has executed, before anything can read its model dictionary. The finder stays armed
until `GANDLF.models` has executed once: an import that fails (a broken GaNDLF dependency) and is retried still
registers.

This module runs in every Python process of the environment: it imports nothing but `os` and `sys`, never
raises, and `GANDLF_DIMLIFT_DISABLE=1` turns it off. Every registration failure becomes one line on stderr;
failures that share a cause (a broken module all plugin architectures import) share that line.
"""

import os
import sys

TARGET = "GANDLF.models"
DISABLE_VARIABLE = "GANDLF_DIMLIFT_DISABLE"
PREFIX = "gandlf-dimlift: WARNING:"


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def register_after_import() -> None:
    """Runs registration; each failure is one warning line, and GaNDLF keeps working without the plugin."""
    try:
        import warnings

        problem = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the registry's load warnings are reported below, one line per cause
            try:
                from gandlf_dimlift.registry import register

                register()
            except Exception as error:  # noqa: BLE001 - the hook must never break GaNDLF
                problem = f"plugin architectures not registered: {type(error).__name__}: {error}"
        for line in _failure_lines() + ([problem] if problem else []):
            sys.stderr.write(f"{PREFIX} {_one_line(line)}\n")
    except Exception:  # noqa: BLE001 - not even the report may break the import of GaNDLF
        pass


def failures_by_cause(failures: list[tuple[str, str, str]]) -> dict[tuple[str, str], list[str]]:
    """Groups `(key, distribution, error)` load failures by (distribution, error): one cause, one report line."""
    causes: dict[tuple[str, str], list[str]] = {}
    for key, distribution, error in failures:
        causes.setdefault((distribution, error), []).append(key)
    return causes


def _failure_lines() -> list[str]:
    """The registry's load failures, one line per distinct cause (naming every architecture it took out)."""
    registry = sys.modules.get("gandlf_dimlift.registry")
    failures = [(f.key, f.distribution, f.error) for f in getattr(registry, "failures", ())]
    return [
        f"architecture{'s' if len(keys) > 1 else ''} {', '.join(repr(k) for k in keys)} of distribution "
        f"{distribution!r} failed to load and {'are' if len(keys) > 1 else 'is'} skipped: {error}"
        for (distribution, error), keys in failures_by_cause(failures).items()
    ]


class _RegisteringLoader:
    """Delegates to GaNDLF's own loader and registers once `GANDLF.models` has executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)  # a failure propagates as GaNDLF's own, and the finder stays armed
        uninstall()
        register_after_import()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class GandlfModelsFinder:
    """A meta path finder for `GANDLF.models`, armed until that module has executed once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        try:
            spec = None
            for finder in list(sys.meta_path):  # the finders after this one, as the import system would ask them
                find = getattr(finder, "find_spec", None)
                if finder is self or isinstance(finder, GandlfModelsFinder) or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        except Exception:  # noqa: BLE001 - let the import system report a broken GaNDLF itself
            return None
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _RegisteringLoader):
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
