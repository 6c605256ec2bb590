"""Registration into an unmodified GaNDLF: the startup hook, explicit register(), and its refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from gandlf_dimlift.registry import RegistrationError, check_key

REPO = Path(__file__).resolve().parents[1]


def python(code: str, env_extra: dict | None = None, cwd: Path | None = None, flags=()) -> subprocess.CompletedProcess:
    from conftest import gandlf_env

    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=gandlf_env(**(env_extra or {})), cwd=cwd, timeout=600)


@pytest.mark.parametrize(
    "key,fragment",
    [("Dimlift_Net", "not lowercase"), ("my_deep_net", "'deep'"), ("sdnet_plus", "'sdnet'"), ("vgg_lift", "'vgg'")],
)
def test_badly_formed_keys_are_refused_with_the_reason(key, fragment):
    with pytest.raises(RegistrationError, match=fragment):
        check_key(key)


def test_hook_registers_when_only_gandlf_is_imported():
    result = python("import GANDLF.models as m; print(sorted(k for k in m.global_models_dict if 'dimlift' in k))")
    assert result.returncode == 0, result.stderr
    assert "dimlift_smp" in result.stdout and "dimlift_slice_attention" in result.stdout
    assert "WARNING" not in result.stderr


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_opt_out_variable_disables_the_hook():
    code = "import GANDLF.models as m; print(any('dimlift' in k for k in m.global_models_dict))"
    assert python(code, {"GANDLF_DIMLIFT_DISABLE": "1"}).stdout.split()[-1] == "False"


VALIDATE = """
    from GANDLF.config_manager import ConfigManager
    from gandlf_dimlift.synthetic import make_config, write_config
    path = write_config(make_config("dimlift_smp", "segmentation"), {path!r})
    ConfigManager(str(path))
    print("VALID")
"""


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_register_after_gandlf_configuration_was_imported(tmp_path):
    code = f"""
        import GANDLF.configuration.parameters_config  # freezes the architecture names
        from gandlf_dimlift.synthetic import make_config, write_config
        from GANDLF.config_manager import ConfigManager
        path = str(write_config(make_config("dimlift_smp", "segmentation"), {str(tmp_path / 'c.yaml')!r}))
        try:
            ConfigManager(path)
            print("unexpectedly valid")
        except BaseException as error:
            print("REJECTED", "architecture" in str(error))
        import gandlf_dimlift
        gandlf_dimlift.register()
        gandlf_dimlift.register()  # idempotent
        ConfigManager(path)
        print("VALID")
    """
    result = python(code, {"GANDLF_DIMLIFT_DISABLE": "1"})
    assert "REJECTED True" in result.stdout, result.stdout + result.stderr
    assert "VALID" in result.stdout, result.stderr[-3000:]


FAKE_ENTRY_POINTS = """
[gandlf.models]
fake_ok = fake_plugin:build
Fake_Upper = fake_plugin:build
resunet = fake_plugin:build
dimlift_smp = fake_plugin:build
fake_deep_net = fake_plugin:build
fake_broken = fake_plugin_missing:build
"""


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_conflicts_bad_keys_and_broken_plugins_are_reported_and_skipped(tmp_path):
    (tmp_path / "fake_plugin.py").write_text("def build(parameters):\n    raise NotImplementedError\n")
    info = tmp_path / "fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(FAKE_ENTRY_POINTS)
    # The fake plugin's folder goes last on sys.path, so gandlf-dimlift's own entry points are found first whatever
    # the working directory holds.
    code = f"""
        import sys
        sys.path.append({str(tmp_path)!r})
        import GANDLF.models as m
        from gandlf_dimlift.registry import registered, register, RegistrationError
        print("OK", "fake_ok" in m.global_models_dict, registered()["dimlift_smp"].distribution)
        print("BUILTIN", m.global_models_dict["resunet"].__module__)
        try:
            register()
        except RegistrationError as error:
            print("ERROR", error)
    """
    result = python(code)
    out, err = result.stdout, result.stderr
    assert "OK True gandlf-dimlift" in out, out + err
    assert "BUILTIN GANDLF.models" in out
    error = out.split("ERROR", 1)[1]
    assert "'Fake_Upper' is not lowercase" in error
    assert "would replace GaNDLF's built-in 'resunet'" in error
    assert "'dimlift_smp' is declared by both 'gandlf-dimlift' and 'fake-plugin'" in error
    assert "'fake_deep_net' contains 'deep'" in error
    # The hook reports each failure as one line: the broken plugin by name, and the refused keys together (the
    # script's own register() call afterwards warns the Python way).
    ours = [line for line in err.split("RuntimeWarning")[0].splitlines() if "gandlf-dimlift" in line]
    assert len(ours) == 2 and all(line.startswith("gandlf-dimlift: WARNING: ") for line in ours), err
    assert "architecture 'fake_broken' of distribution 'fake-plugin' failed to load and is skipped" in ours[0]
    assert "RegistrationError" in ours[1] and "'Fake_Upper' is not lowercase" in ours[1]


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_wheel_carries_the_hook_and_registers_when_installed(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(wheels)],
                   check=True, timeout=600)
    wheel = next(wheels.glob("gandlf_dimlift-*.whl"))
    assert "gandlf_dimlift_hook.pth" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    assert (site / "gandlf_dimlift_hook.pth").is_file()
    import sysconfig

    # -S: skip this environment's own .pth files (its editable install); then add the environment's packages
    # plainly and the scratch folder as a site directory, whose .pth must arm the hook by itself.
    code = f"""
        import sys, site
        sys.path.append({sysconfig.get_paths()['purelib']!r})
        site.addsitedir({str(site)!r})
        import GANDLF.models as m
        import gandlf_dimlift
        print("FROM", gandlf_dimlift.__file__)
        print("KEYS", sorted(k for k in m.global_models_dict if "dimlift" in k))
    """
    result = python(code, cwd=tmp_path, flags=("-S",))
    assert f"FROM {site}" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "'dimlift_smp'" in result.stdout


def test_startup_hook_imports_nothing_heavy():
    code = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'GANDLF', 'numpy')))"
    result = python(code)
    assert result.stdout.strip() == "[]"
    armed = python("import sys, gandlf_dimlift._startup as s; print(s.installed())")
    assert armed.stdout.strip() == "True"


def _site_with_hook(tmp_path: Path, package_init: str | None) -> Path:
    """A site directory holding this checkout's .pth and, if given, a `gandlf_dimlift` package with that
    `__init__` (shadowing the real one), for an interpreter started with -S."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "gandlf_dimlift_hook.pth").write_text((REPO / "gandlf_dimlift_hook.pth").read_text())
    if package_init is not None:
        (site / "gandlf_dimlift").mkdir()
        (site / "gandlf_dimlift" / "__init__.py").write_text(package_init)
    return site


def _with_site(site: Path, code: str) -> str:
    """`code` after putting this environment's packages (without their .pth files) and `site` on the path."""
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    return f"import sys, site\nsys.path.append({purelib!r})\nsite.addsitedir({str(site)!r})\n" + textwrap.dedent(code)


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_hook_reports_its_own_import_failure_once_when_gandlf_is_imported(tmp_path):
    site = _site_with_hook(tmp_path, "raise ImportError('simulated: gandlf_dimlift is broken')\n")
    no_checkout = {"PYTHONPATH": ""}  # run in tmp_path with no checkout on the path: only the broken package
    unrelated = python(_with_site(site, "print('unrelated program')"), no_checkout, tmp_path, ("-S",))
    assert unrelated.returncode == 0 and unrelated.stderr == "", unrelated.stderr
    code = """
        import GANDLF.models
        import importlib; importlib.reload(GANDLF.models)
        print("GaNDLF works", len(GANDLF.models.global_models_dict) > 10)
    """
    result = python(_with_site(site, code), no_checkout, tmp_path, ("-S",))
    assert "GaNDLF works True" in result.stdout, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if "gandlf-dimlift" in line or "gandlf_dimlift" in line]
    assert ours == [
        "gandlf-dimlift: WARNING: plugin architectures not registered: the gandlf_dimlift package failed to import "
        "(ImportError: simulated: gandlf_dimlift is broken); reinstall gandlf-dimlift, or set "
        "GANDLF_DIMLIFT_DISABLE=1 to run GaNDLF without it"
    ]
    # Opted out, nothing is armed (so nothing reports) even though the package fails.
    code = "print('FINDERS', [type(f).__name__ for f in sys.meta_path if 'Gandlf' in type(f).__name__])"
    opted_out = python(_with_site(site, code), {**no_checkout, "GANDLF_DIMLIFT_DISABLE": "1"}, tmp_path, ("-S",))
    assert "FINDERS []" in opted_out.stdout and opted_out.stderr == "", opted_out.stderr


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_a_broken_shared_model_module_is_one_line(tmp_path):
    """Every plugin architecture imports gandlf_dimlift.models.common: broken, it takes out all four, in one line."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(REPO / "gandlf_dimlift", copy / "gandlf_dimlift")
    common = copy / "gandlf_dimlift" / "models" / "common.py"
    common.write_text(common.read_text() + "\nraise ImportError('simulated broken shared module')\n")
    result = python("import GANDLF.models as m; print('KEYS', [k for k in m.global_models_dict if 'dimlift' in k])",
                    {"PYTHONPATH": str(copy)}, cwd=tmp_path)  # only the copy on the path, not this checkout
    assert "KEYS []" in result.stdout, result.stdout + result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if "gandlf-dimlift" in line or "gandlf_dimlift" in line]
    assert len(ours) == 1, result.stderr
    assert ours[0].startswith("gandlf-dimlift: WARNING: architectures 'dimlift_")
    assert "ImportError: simulated broken shared module" in ours[0]
    for key in ("dimlift_smp", "dimlift_dxnet", "dimlift_omnianet", "dimlift_slice_attention"):
        assert repr(key) in ours[0]


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_hook_registers_when_gandlf_models_is_imported_again_after_a_failure():
    code = """
        import sys
        class FailOnce:
            failed = False
            def find_spec(self, name, path=None, target=None):
                if name == "GANDLF.models.unet" and not self.failed:
                    self.failed = True
                    raise ImportError("simulated transient failure")
        sys.meta_path.insert(0, FailOnce())
        try:
            import GANDLF.models
        except ImportError as error:
            print("FIRST", error)
        import GANDLF.models as m
        print("KEYS", sorted(k for k in m.global_models_dict if "dimlift" in k))
        import gandlf_dimlift._startup as s
        print("ARMED", s.installed())
    """
    result = python(code)
    assert "FIRST simulated transient failure" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "KEYS ['dimlift_dxnet', 'dimlift_omnianet', 'dimlift_slice_attention', 'dimlift_smp']" in result.stdout
    assert "ARMED False" in result.stdout  # disarmed once registered
    assert "gandlf-dimlift" not in result.stderr
