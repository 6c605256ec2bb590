"""What the plugin tells the user, on the console and in GaNDLF's log, also under `gandlf_run`.

GaNDLF 0.1.5's entry points configure logging with `logging.config.dictConfig`, whose default
`disable_existing_loggers=True` silences every logger that exists at that moment: every `gandlf_dimlift.*` module
logger, since the plugin is imported together with `GANDLF.models`, and the `py.warnings` logger that
`logging.captureWarnings` routes Python warnings to. So `warnings.warn` never reaches a `gandlf_run` user, and
neither would the module loggers. The model builder calls `enable()` before it speaks; GaNDLF's handlers then
print INFO on stdout, WARNING and above on stderr, and everything in its log file.
"""

from __future__ import annotations

import logging

PACKAGE = "gandlf_dimlift"


def enable() -> None:
    """Re-enables the package's loggers that a later `dictConfig` disabled (cheap; idempotent)."""
    for name, candidate in list(logging.Logger.manager.loggerDict.items()):
        if (name == PACKAGE or name.startswith(PACKAGE + ".")) and isinstance(candidate, logging.Logger):
            candidate.disabled = False

