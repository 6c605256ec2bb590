"""Build-time check of the gandlf-dimlift layer: the plugin is installed and GaNDLF sees its architectures.

Run by docker/Dockerfile as `python3.11 check_registration.py` right after the plugin is installed, in a fresh
interpreter, so it checks what every later `gandlf run` in the image will see:

1. gandlf-dimlift and GaNDLF are installed, and GaNDLF's version satisfies the plugin's requirement;
2. the startup hook (`gandlf_dimlift_hook.pth` at the site-packages root) ran at interpreter start-up and the
   opt-out variable GANDLF_DIMLIFT_DISABLE is not set in the image;
3. importing `GANDLF.models` registers every `dimlift_*` key, GaNDLF's own config parser accepts a config
   that names one, and GaNDLF's `get_model` builds it and runs a forward pass.

Exits with status 1 and one message per problem (naming the missing package, file or variable and the fix);
prints a one-line summary and exits 0 otherwise. Only the standard library is imported before step 3.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PLUGIN = "gandlf-dimlift"
HOST = "gandlf"
HOOK = "gandlf_dimlift_hook.pth"
DISABLE = "GANDLF_DIMLIFT_DISABLE"
# The architecture the check builds: small, no weights download.
PROBE = ("dimlift_smp", {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False})
# Imported by the startup hook before this script's first line runs.
HOOK_RAN = "gandlf_dimlift" in sys.modules


class CheckFailed(Exception):
    """One failed step; the message says what is missing and how to fix it."""


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> tuple[str, str]:
    plugin, host = version_of(PLUGIN), version_of(HOST)
    problems = []
    if plugin is None:
        problems.append(
            f"{PLUGIN} is not installed in {sys.executable}: this layer must install it "
            f"(`{Path(sys.executable).name} -m pip install --no-deps <{PLUGIN} wheel or {PLUGIN}==VERSION>`)."
        )
    if host is None:
        problems.append(
            f"{HOST} (GaNDLF) is not installed in {sys.executable}: build this layer FROM a GaNDLF image or an "
            "image made by `gandlf deploy`, and point the PYTHON build argument at that image's interpreter."
        )
    if problems:
        raise CheckFailed(" ".join(problems))
    requirement = next(
        (r for r in metadata.requires(PLUGIN) or [] if r.split(";")[0].strip().lower().startswith(HOST)), None
    )
    if requirement:
        try:
            from packaging.requirements import Requirement
        except ImportError:  # GaNDLF depends on packaging; without it skip only this comparison
            return plugin, host
        wanted = Requirement(requirement.split(";")[0])
        if wanted.name.lower() == HOST and not wanted.specifier.contains(host, prereleases=True):
            raise CheckFailed(
                f"{PLUGIN} {plugin} requires {wanted}, but the base image has GaNDLF {host}. Use a base image "
                f"built from GaNDLF {wanted.specifier}, or a {PLUGIN} release made for GaNDLF {host}."
            )
    return plugin, host


def check_hook() -> None:
    if os.environ.get(DISABLE, "").strip().lower() not in ("", "0", "false", "no"):
        raise CheckFailed(
            f"{DISABLE}={os.environ[DISABLE]!r} is set in the image environment, so GaNDLF will not see the "
            f"plugin architectures: remove `ENV {DISABLE}` from the image (or unset it before `gandlf run`)."
        )
    if not HOOK_RAN:
        import site

        roots = [*site.getsitepackages(), site.getusersitepackages()]
        found = [str(Path(root) / HOOK) for root in roots if (Path(root) / HOOK).exists()]
        where = f"it exists at {found} but was not processed" if found else f"it is not in any of {roots}"
        raise CheckFailed(
            f"The {PLUGIN} startup hook {HOOK} did not run when Python started ({where}). Install {PLUGIN} "
            "into the interpreter's site-packages (not with `pip --target` or into another Python), and do not "
            "start Python with -S or -I."
        )


def check_gandlf_builds_the_plugin() -> list[str]:
    import torch
    from GANDLF.config_manager import ConfigManager
    from GANDLF.models import get_model, global_models_dict

    keys = sorted(key for key in global_models_dict if key.startswith("dimlift_"))
    if PROBE[0] not in keys:
        raise CheckFailed(
            f"GaNDLF imported, but its model dictionary has no {PROBE[0]!r} (plugin keys found: {keys}). Check the "
            f"warning `{PLUGIN}: WARNING: ...` above for the registration error."
        )
    from gandlf_dimlift.synthetic import make_config, write_config

    config = make_config(PROBE[0], "segmentation", patch_size=(32, 32, 32), model_options=PROBE[1])
    with tempfile.TemporaryDirectory() as folder:
        parameters = ConfigManager(str(write_config(config, Path(folder) / "config.yaml")))
    parameters["problem_type"] = "segmentation"
    model = get_model(parameters).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 32, 32, 32))
    if tuple(out.shape) != (1, 2, 32, 32, 32):
        raise CheckFailed(f"{PROBE[0]} built by GaNDLF returned shape {tuple(out.shape)}, not (1, 2, 32, 32, 32).")
    return keys


def main() -> int:
    try:
        plugin, host = check_installed()
        check_hook()
        keys = check_gandlf_builds_the_plugin()
    except CheckFailed as error:
        sys.stderr.write(f"gandlf-dimlift layer check FAILED: {error}\n")
        return 1
    print(f"gandlf-dimlift layer check OK: {PLUGIN} {plugin} on GaNDLF {host} ({sys.executable}); "
          f"registered: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
