"""Builds the gandlf-dimlift deployment image with a real image builder and checks it from the inside.

    python docker/build_and_check.py                 # the whole build and check (minutes to an hour)
    python docker/build_and_check.py --dry-run       # checks the inputs and prints the plan; builds nothing

Run it from an environment that has GaNDLF and gandlf-dimlift installed (it trains the small model there and
infers with it outside the image). Steps, each printed with its time; a failing step stops the run with its name:

 1. inputs        the files, the host's GaNDLF and plugin, the versions and image names;
 2. builder       Docker when its daemon answers, else buildah (podman only imports a root file system);
 3. wheel         `pip wheel --no-deps` of this repository into a minimal build context (docker/ and dist/);
 4. os-image      a Debian bookworm image made offline with debootstrap (or the one given with --os-image);
 5. gandlf-image  docker/gandlf-standin.Dockerfile: a stand-in for the image `gandlf deploy` builds
                  (python3.11, gandlf==0.1.5);
 6. model         a small dimlift_slice_attention classifier trained by the host's `gandlf_run`, and its
                  predictions by the host's `gandlf run --infer`;
 7. deploy        the model and config embedded as `gandlf deploy` embeds them (/embedded_model,
                  /embedded_config.yml), committed as the "deployed" image;
 8. no-plugin     the deployed image without the plugin must reject the config with GaNDLF's own error;
 9. layer         docker/Dockerfile on top of the deployed image (its build runs check_registration.py);
10. layer-size    the sizes of the layers docker/Dockerfile added, against the wheel's;
11. registration  check_registration.py again, in a container of the finished image;
12. validate      GaNDLF's ConfigManager validates the embedded plugin config in the image;
13. infer         `gandlf run --infer` in the image on the data mounted at /data, predictions to /out;
14. compare       the in-image predictions against the host's, numerically;
15. bad-inputs    (--bad-input-checks) the layer's build must fail, naming the cause, on the OS image (no
                  python3.11), on the stand-in's `python` stage (no GaNDLF) and on the stand-in with GaNDLF 0.1.4.

Images already present (the OS image, the stand-in) are reused unless --rebuild. The last line names the image
and the result. Only the standard library is imported; the host's GaNDLF runs in subprocesses.
"""

from __future__ import annotations

import argparse
import configparser
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
STANDIN_DOCKERFILE = REPO / "docker" / "gandlf-standin.Dockerfile"
CHECK_SCRIPT = REPO / "docker" / "check_registration.py"
IMAGE_PREFIX = "localhost/gandlf-dimlift-deploy"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# GaNDLF's own error for an architecture its config model does not list (pydantic's Literal check).
GANDLF_REJECTION = ("validation error for Parameters", "model.architecture", "literal_error")
# buildah's settings for this kind of host (cgroups v1 in hybrid mode, no RLIMIT changes allowed): see DESIGN.md.
CONTAINERS_CONF = """[containers]
default_ulimits = []
cgroups = "disabled"

[engine]
cgroup_manager = "cgroupfs"
"""
# The model the image runs: small, no weights download, a classifier whose probabilities can be compared.
MODEL_OPTIONS = {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False, "final_layer": "logits",
                 "slice_chunk_size": 32, "freeze_encoder_steps": 0}
ARCHITECTURE = "dimlift_slice_attention"
IMAGE_NAME = re.compile(r"^[a-z0-9]+([._/-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
# In every container: no GPU, the thread count the host's runs use (same summation order, same results).
CONTAINER_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
# Where the host's CA bundle is mounted in builds and containers that need the network.
CA_INSIDE = "/run/gandlf-dimlift-ca-bundle.crt"
# Largest difference of probabilities in and outside the image that still counts as agreement.
TOLERANCE = 1e-5


class StepFailed(Exception):
    """A step's failure; the message names the cause and the fix."""


def say(line: str = "") -> None:
    print(line, flush=True)


def command_text(command: Sequence[str]) -> str:
    """The command as a shell line; an inline script shows as <script: its first line>."""
    def quoted(word: str) -> str:
        if "\n" in word:
            return f"<script: {word.strip().splitlines()[0]} ...>"
        return word if re.fullmatch(r"[\w@%+=:,./-]+", word) else repr(word)

    return " ".join(quoted(word) for word in command)


def run(command: Sequence[str], *, check: bool = True, quiet: bool = False, log: Path | None = None,
        env: dict[str, str] | None = None, stdin_file: IO[bytes] | None = None) -> subprocess.CompletedProcess:
    """Runs a command, output merged; with `log` it is appended to that file, else captured (and echoed unless quiet).

    The result's stdout is this command's output only. With `check`, a non-zero exit raises StepFailed with the
    command and the end of its output.
    """
    say(f"    $ {command_text(command)}")
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"$ {command_text(command)}\n")
            handle.flush()
            offset = handle.tell()  # earlier runs' output in the same log must not count
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env,
                                    stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL)
        with open(log, "rb") as handle:
            handle.seek(offset)
            result.stdout = handle.read().decode(errors="replace")
    else:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL)
        if not quiet and result.stdout.strip() and not (check and result.returncode):  # a failure shows its tail
            for line in result.stdout.rstrip().splitlines():
                say(f"      {line}")
    if check and result.returncode != 0:
        tail = "\n".join(result.stdout.rstrip().splitlines()[-25:])
        where = f" (full output: {log})" if log else ""
        raise StepFailed(f"`{command_text(command)}` exited with {result.returncode}{where}:\n{tail}")
    return result


# --------------------------------------------------------------------------------------------------------------
# Builders


@dataclass
class Builder:
    """An image builder on this machine: `docker` (with a reachable daemon) or `buildah` (daemonless)."""

    name: str
    version: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def exe(self, *arguments: str) -> list[str]:
        return [self.name, *arguments]

    def image_exists(self, image: str) -> bool:
        command = ["image", "inspect", image] if self.name == "docker" else ["inspect", "--type", "image", image]
        return subprocess.run(self.exe(*command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=self.env).returncode == 0

    def build(self, dockerfile: Path, context: Path, tag: str, build_args: dict[str, str], log: Path,
              target: str | None = None, mounts: Sequence[str] = (), check: bool = True,
              no_cache: bool = False) -> subprocess.CompletedProcess:
        """Builds `dockerfile` in `context` as `tag`; `mounts` are buildah `--volume` specs for the build only."""
        arguments = [f"--build-arg={k}={v}" for k, v in build_args.items()]
        arguments += ([f"--target={target}"] if target else []) + (["--no-cache"] if no_cache else [])
        if self.name == "docker":
            if mounts:
                raise StepFailed("docker build cannot mount host files into a build; run with --ca-bundle none "
                                 "or use --builder buildah.")
            command = self.exe("build", "--force-rm", "-f", str(dockerfile), "-t", tag, *arguments, str(context))
        else:
            volumes = [f"--volume={m}" for m in mounts]
            command = self.exe("bud", "--isolation=chroot", "--layers", "--force-rm", "-f", str(dockerfile), "-t", tag,
                               *volumes, *arguments, str(context))
        return run(command, log=log, env=self.env, check=check)

    def import_rootfs(self, rootfs: Path, tag: str, log: Path) -> None:
        """Imports a root file system folder as a one-layer image."""
        tool = "docker" if self.name == "docker" else "podman"
        if shutil.which(tool) is None:
            raise StepFailed(f"importing a root file system needs `{tool} import`, and {tool} is not installed "
                             f"(Debian: apt-get install {tool}); or pass an existing image with --os-image.")
        say(f"    $ tar -C {rootfs} -c . | {tool} import - {tag}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run([tool, "import", "-", tag], log=log, env=self.env, stdin_file=tar.stdout)
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise StepFailed(f"tar of {rootfs} exited with {tar.returncode}")

    def run_in(self, image: str, command: Sequence[str], volumes: Sequence[tuple[Path | str, str]] = (),
               log: Path | None = None, check: bool = True, quiet: bool = False,
               commit_as: str | None = None) -> subprocess.CompletedProcess:
        """Runs `command` in a fresh container of `image` (its entrypoint bypassed), then removes the container.

        The container gets CONTAINER_ENV and the `(host path, container path)` bind mounts in `volumes`; with
        `commit_as` its file system is committed as that image first.
        """
        mounts = [f"--volume={host}:{inside}" for host, inside in volumes]
        variables = [f"--env={k}={v}" for k, v in CONTAINER_ENV.items()]
        if self.name == "docker":
            name = f"gandlf-dimlift-check-{os.getpid()}"
            arguments = ["--name", name] if commit_as else ["--rm"]
            try:
                result = run(self.exe("run", *arguments, "--entrypoint", command[0], *mounts, *variables, image,
                                      *command[1:]), log=log, env=self.env, check=check, quiet=quiet)
                if commit_as:
                    run(self.exe("commit", name, commit_as), quiet=True, env=self.env)
                return result
            finally:
                if commit_as:
                    self.remove_container(name)
        container = self.from_image(image)
        try:
            result = run(self.exe("run", "--isolation=chroot", *mounts, *variables, container, "--", *command),
                         log=log, env=self.env, check=check, quiet=quiet)
            if commit_as:
                run(self.exe("commit", container, commit_as), quiet=True, env=self.env)
            return result
        finally:
            self.remove_container(container)

    def from_image(self, image: str) -> str:
        if self.name == "docker":
            return run(self.exe("create", image), quiet=True, env=self.env).stdout.strip().splitlines()[-1]
        return run(self.exe("from", "--pull-never", image), quiet=True, env=self.env).stdout.strip().splitlines()[-1]

    def remove_container(self, container: str) -> None:
        subprocess.run(self.exe("rm", "-f", container) if self.name == "docker" else self.exe("rm", container),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)

    def commit_with_files(self, image: str, files: Sequence[tuple[Path, str]], tag: str) -> None:
        """Copies host files or folders into a container of `image` and commits it as `tag` (as `gandlf deploy`)."""
        container = self.from_image(image)
        try:
            for source, destination in files:
                if self.name == "docker":  # `folder/.` copies the folder's contents, as buildah copy does
                    contents = f"{source}/." if source.is_dir() else str(source)
                    run(self.exe("cp", contents, f"{container}:{destination}"), env=self.env)
                else:
                    run(self.exe("copy", container, str(source), destination), quiet=True, env=self.env)
            run(self.exe("commit", container, tag), quiet=True, env=self.env)
        finally:
            self.remove_container(container)

    def remove_image(self, image: str) -> None:
        subprocess.run(self.exe("rmi", image), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)

    def layers(self, image: str) -> list[tuple[int, str]]:
        """The image's layers, oldest first, as (uncompressed size in bytes, the instruction that made it)."""
        if self.name == "docker":
            out = run(self.exe("history", "--no-trunc", "--human=false", "--format", "{{json .}}", image),
                      quiet=True, env=self.env).stdout
            rows = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
            return [(int(r["Size"]), r["CreatedBy"]) for r in reversed(rows) if int(r["Size"]) > 0]
        info = json.loads(run(self.exe("inspect", "--type", "image", image), quiet=True, env=self.env).stdout)
        history = [h for h in info["OCIv1"].get("history", []) if not h.get("empty_layer")]
        layers = json.loads(info["Manifest"])["layers"]
        if len(history) != len(layers):  # an imported image has layers without history entries
            history = [{}] * (len(layers) - len(history)) + history
        return [(int(layer["size"]), h.get("created_by", "(imported)")) for layer, h in zip(layers, history,
                                                                                           strict=True)]


def detect_builder(requested: str, env: dict[str, str]) -> tuple[Builder | None, list[str]]:
    """Finds an image builder: Docker only when its daemon answers, else buildah.

    Returns:
        The builder (None when none works) and one line per candidate saying what was found.
    """
    notes = []
    candidates = ["docker", "buildah"] if requested == "auto" else [requested]
    for name in candidates:
        path = shutil.which(name, path=env.get("PATH"))
        if path is None:
            notes.append(f"{name}: not installed (not on PATH)")
            continue
        if name == "docker":
            probe = subprocess.run([path, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                   text=True, env=env, timeout=60)
            if probe.returncode != 0 or not probe.stdout.strip():
                reason = ((probe.stderr or probe.stdout).strip().splitlines() or ["no reply"])[-1]
                notes.append(f"docker: client at {path}, but no daemon answers ({reason})")
                continue
            version = probe.stdout.strip()
        else:
            probe = subprocess.run([path, "--version"], capture_output=True, text=True, env=env, timeout=60)
            if probe.returncode != 0:
                notes.append(f"buildah: {path} does not run ({(probe.stderr or probe.stdout).strip()[-200:]})")
                continue
            version = probe.stdout.split("version")[-1].split()[0] if "version" in probe.stdout else "?"
        notes.append(f"{name}: {version} at {path} -> using {name}")
        return Builder(name, version, env), notes
    return None, notes


# --------------------------------------------------------------------------------------------------------------
# Inputs


def plugin_version() -> str:
    text = (REPO / "gandlf_dimlift" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise StepFailed("gandlf_dimlift/__init__.py has no __version__ line.")
    return match.group(1)


def required_gandlf_version() -> str:
    """The exact GaNDLF version setup.cfg pins (`gandlf==X`)."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    requirements = parser.get("options", "install_requires", fallback="")
    match = re.search(r"^\s*gandlf\s*==\s*([\w.]+)\s*$", requirements, re.M | re.I)
    if not match:
        raise StepFailed(f"setup.cfg's install_requires does not pin gandlf==VERSION: {requirements.strip()!r}")
    return match.group(1)


def host_versions(python: str) -> dict[str, str | None]:
    """GaNDLF and gandlf-dimlift as the host interpreter sees them (and where the plugin's code is)."""
    code = ("import json, importlib.metadata as m, importlib.util as u\n"
            "def v(d):\n  try: return m.version(d)\n  except m.PackageNotFoundError: return None\n"
            "s = u.find_spec('gandlf_dimlift')\n"
            "print(json.dumps({'gandlf': v('gandlf'), 'gandlf-dimlift': v('gandlf-dimlift'),"
            " 'plugin_code': s.origin if s else None}))")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GANDLF_DIMLIFT_DISABLE": "1"})
    if result.returncode != 0:
        raise StepFailed(f"{python} cannot report its packages: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def default_ca_bundle() -> str | None:
    """The CA bundle the host's pip is told to use (PIP_CERT, then SSL_CERT_FILE/REQUESTS_CA_BUNDLE), if any."""
    for variable in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def torch_index_reachable(url: str, ca_bundle: str | None) -> tuple[bool, str]:
    """Whether PyTorch's CPU wheel index answers from this machine; returns (reachable, what happened)."""
    import ssl

    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=15, context=context) as response:
            return response.status == 200, f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return False, str(getattr(error, "reason", error))


@dataclass
@dataclass
class Plan:
    """Everything the run needs, resolved from the arguments; printed by --dry-run."""

    work: Path
    tag: str
    os_image: str
    os_image_given: bool
    gandlf_image: str
    deployed_image: str
    python_image: str
    gandlf_version: str
    plugin_version: str
    torch_index: str | None
    ca_bundle: str | None
    ca_bundle_given: bool
    mirror: str
    python: str
    bad_input_checks: bool
    rebuild: bool
    builder: Builder | None = None

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"


def check_inputs(args: argparse.Namespace) -> Plan:
    """Validates the arguments and the files the run needs; every error names the bad value and the fix."""
    missing = [str(p) for p in (DOCKERFILE, STANDIN_DOCKERFILE, CHECK_SCRIPT, REPO / "setup.cfg") if not p.is_file()]
    if missing:
        raise StepFailed(f"missing {', '.join(missing)}: run from a complete gandlf-dimlift checkout.")
    version, required = plugin_version(), required_gandlf_version()
    if args.gandlf_version != required:
        raise StepFailed(f"--gandlf-version {args.gandlf_version}: gandlf-dimlift {version} requires "
                         f"gandlf=={required}, so the stand-in must have GaNDLF {required} (drop the option). "
                         "--bad-input-checks builds an image with another GaNDLF version on purpose.")
    for option in ("tag", "os_image"):
        value = getattr(args, option)
        if value is not None and not IMAGE_NAME.match(value):
            raise StepFailed(f"--{option.replace('_', '-')} {value!r} is not an image name: use lowercase "
                             "[registry/]name[:tag], e.g. localhost/gandlf-dimlift:1.0.")
    work = Path(args.work).resolve()
    if work == REPO or REPO in work.parents:
        raise StepFailed(f"--work {work} is inside the repository {REPO}: root file systems, wheels and logs must "
                         "not land in the checkout. Use a folder elsewhere, e.g. /var/tmp/gandlf-dimlift-deploy.")
    versions = host_versions(args.python)
    if versions["gandlf"] != required:
        raise StepFailed(f"{args.python} has GaNDLF {versions['gandlf']}, not {required}: the model step trains "
                         f"and infers with the host's GaNDLF. Pass --python with an environment that has "
                         f"gandlf=={required} and gandlf-dimlift.")
    if versions["gandlf-dimlift"] is None or versions["plugin_code"] is None:
        raise StepFailed(f"{args.python} cannot import gandlf_dimlift: install this checkout there "
                         "(`pip install -e .`) or pass --python.")
    ca_bundle = None if args.ca_bundle == "none" else (args.ca_bundle or default_ca_bundle())
    if ca_bundle and not Path(ca_bundle).is_file():
        raise StepFailed(f"--ca-bundle {ca_bundle}: no such file (--ca-bundle none builds without one).")
    torch_index = None if args.torch_index == "pypi" else args.torch_index
    if torch_index not in (None, "auto") and not torch_index.startswith(("http://", "https://", "file://")):
        raise StepFailed(f"--torch-index {torch_index!r}: give auto, pypi or a wheel index URL such as "
                         f"{CPU_TORCH_INDEX}.")
    return Plan(
        work=work,
        tag=args.tag or f"{IMAGE_PREFIX}/gandlf-dimlift:{version}",
        os_image=args.os_image or f"{IMAGE_PREFIX}/debian:{DEBIAN_SUITE}",
        os_image_given=args.os_image is not None,
        gandlf_image=f"{IMAGE_PREFIX}/gandlf-standin:{required}",
        deployed_image=f"{IMAGE_PREFIX}/deployed:{version}",
        python_image=f"{IMAGE_PREFIX}/python-only:{DEBIAN_SUITE}",
        gandlf_version=required,
        plugin_version=version,
        torch_index=torch_index,
        ca_bundle=ca_bundle,
        ca_bundle_given=args.ca_bundle not in (None, "none"),
        mirror=args.mirror,
        python=args.python,
        bad_input_checks=args.bad_input_checks,
        rebuild=args.rebuild,
    )


class Steps:
    """Runs named steps in order, printing each with its time; the first failure stops the run naming its step."""

    def __init__(self, total: int):
        self.total = total
        self.times: list[tuple[str, float]] = []

    def __call__(self, name: str, action: Callable[[], str]) -> None:
        index = len(self.times) + 1
        say(f"\n[{index}/{self.total}] {name}")
        start = time.monotonic()
        try:
            summary = action()
        except StepFailed as error:
            say(f"[{index}/{self.total}] {name}: FAILED after {time.monotonic() - start:.1f} s")
            raise StepFailed(f"step '{name}' failed: {error}") from None
        seconds = time.monotonic() - start
        self.times.append((name, seconds))
        say(f"[{index}/{self.total}] {name}: {summary} ({seconds:.1f} s)")


def human(size: float) -> str:
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------------------
# Steps


def print_plan(plan: Plan) -> str:
    say(f"    image to build:  {plan.tag}")
    say(f"    GaNDLF image:    {plan.gandlf_image} (stand-in for `gandlf deploy`'s, from {plan.os_image})")
    say(f"    deployed image:  {plan.deployed_image} (the stand-in with a model embedded as gandlf deploy does)")
    say(f"    work folder:     {plan.work}")
    say(f"    host python:     {plan.python}")
    say(f"    torch index:     {plan.torch_index or 'PyPI'}"
        + (f" ({CPU_TORCH_INDEX} when reachable, else PyPI)" if plan.torch_index == "auto" else ""))
    say(f"    pip CA bundle:   {plan.ca_bundle or 'none'}")
    return f"gandlf-dimlift {plan.plugin_version} for GaNDLF {plan.gandlf_version}"


def find_builder(plan: Plan, requested: str, env: dict[str, str], dry_run: bool) -> str:
    own_conf = env["CONTAINERS_CONF"] == str(plan.work / "containers.conf")
    if own_conf:  # buildah and podman read it even for --version
        plan.work.mkdir(parents=True, exist_ok=True)
        Path(env["CONTAINERS_CONF"]).write_text(CONTAINERS_CONF)
    builder, notes = detect_builder(requested, env)
    for note in notes:
        say(f"    {note}")
    plan.builder = builder
    if builder is None:
        wanted = "Docker with a running daemon, or buildah" if requested == "auto" else requested
        if dry_run:
            return f"none usable here: a real run needs {wanted}"
        raise StepFailed(f"no usable image builder: install {wanted} (Debian: apt-get install buildah podman "
                         "debootstrap), or start the Docker daemon.")
    if builder.name == "docker" and plan.ca_bundle:
        if plan.ca_bundle_given:
            raise StepFailed("--ca-bundle needs buildah: docker build cannot mount a host file into a build. Give "
                             "the Docker daemon's builds the network they need, and leave --ca-bundle out.")
        say(f"    pip CA bundle {plan.ca_bundle} (from the environment) not used: docker build cannot mount it")
        plan.ca_bundle = None
    if builder.name == "buildah":
        source = "written by this script: no ulimits, no cgroups" if own_conf else "from the environment"
        say(f"    CONTAINERS_CONF={env['CONTAINERS_CONF']} ({source})")
    return f"{builder.name} {builder.version}"


def build_wheel(plan: Plan) -> str:
    """The wheel, built from a copy of the sources, in a build context holding only docker/ and dist/."""
    context = plan.work / "context"
    shutil.rmtree(context, ignore_errors=True)
    (context / "dist").mkdir(parents=True)
    shutil.copytree(REPO / "docker", context / "docker", ignore=shutil.ignore_patterns("__pycache__"))
    source = plan.work / "source"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                "tests", "benchmarks", "docs", ".ci"))
    run([plan.python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(context / "dist"), str(source)])
    shutil.rmtree(source, ignore_errors=True)
    wheels = sorted((context / "dist").glob("gandlf_dimlift-*.whl"))
    if len(wheels) != 1:
        raise StepFailed(f"expected one gandlf_dimlift wheel in {context / 'dist'}, found {wheels}")
    return f"{wheels[0].name}, {human(wheels[0].stat().st_size)}, in the build context {context}"


def make_os_image(plan: Plan, builder: Builder) -> str:
    if plan.os_image_given:
        if not builder.image_exists(plan.os_image):
            raise StepFailed(f"--os-image {plan.os_image} is not in {builder.name}'s image storage: pull or import "
                             "it first, or leave --os-image out to make one with debootstrap.")
        return f"{plan.os_image} given with --os-image"
    if builder.image_exists(plan.os_image) and not plan.rebuild:
        return f"{plan.os_image} already present: reused (--rebuild makes it anew)"
    if shutil.which("debootstrap") is None:
        raise StepFailed("debootstrap is not installed (Debian: apt-get install debootstrap); or give a Debian "
                         "bookworm image with --os-image (e.g. debian:bookworm-slim where a registry is reachable).")
    rootfs = plan.work / "rootfs"
    run(["rm", "-rf", "--one-file-system", str(rootfs)], quiet=True)
    run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), plan.mirror], log=plan.log("debootstrap"))
    builder.import_rootfs(rootfs, plan.os_image, plan.log("import"))
    run(["rm", "-rf", "--one-file-system", str(rootfs)], quiet=True)
    return f"{plan.os_image}, {human(sum(s for s, _ in builder.layers(plan.os_image)))}"


def resolve_torch_index(plan: Plan) -> str:
    if plan.torch_index != "auto":
        return plan.torch_index or "PyPI (--torch-index pypi)"
    reachable, what = torch_index_reachable(CPU_TORCH_INDEX, plan.ca_bundle)
    plan.torch_index = CPU_TORCH_INDEX if reachable else None
    if reachable:
        return f"{CPU_TORCH_INDEX} answers ({what}): the CPU-only torch"
    return (f"{CPU_TORCH_INDEX} not reachable ({what}): torch 2.7.1 from PyPI, the CUDA build with its nvidia-* "
            "libraries (a larger image; on a CPU it computes as the CPU build does)")


def standin_build(plan: Plan, builder: Builder, tag: str, target: str | None = None) -> None:
    """Builds the stand-in (or, with target="python", its first stage: no GaNDLF, no network but apt's)."""
    args, mounts = {"OS_IMAGE": plan.os_image}, []
    if target is None:
        args |= {"GANDLF_VERSION": plan.gandlf_version, "TORCH_INDEX_URL": plan.torch_index or ""}
    if plan.ca_bundle and target is None:
        args["CA_BUNDLE"] = CA_INSIDE
        mounts.append(f"{Path(plan.ca_bundle).resolve()}:{CA_INSIDE}:ro")
    empty = plan.work / "empty-context"
    empty.mkdir(exist_ok=True)
    builder.build(STANDIN_DOCKERFILE, empty, tag, args, plan.log(tag.rsplit("/", 1)[-1].replace(":", "-")),
                  target=target, mounts=mounts, no_cache=plan.rebuild and target is None)


def build_gandlf_image(plan: Plan, builder: Builder) -> str:
    if builder.image_exists(plan.gandlf_image) and not plan.rebuild:
        return f"{plan.gandlf_image} already present: reused (--rebuild makes it anew)"
    say(f"    torch: {resolve_torch_index(plan)}")
    if plan.ca_bundle:
        say(f"    pip CA bundle: {plan.ca_bundle}, mounted at {CA_INSIDE} for the build only")
    standin_build(plan, builder, plan.gandlf_image)
    return f"{plan.gandlf_image}, {human(sum(s for s, _ in builder.layers(plan.gandlf_image)))}"


WRITE_MODEL_INPUTS = """
import csv, json, sys
from pathlib import Path
from gandlf_dimlift.synthetic import make_config, write_config, write_dataset

root, architecture, options = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
table = write_dataset(root / "data", "classification", n_subjects=6, shape=(32, 32, 32), seed=3)
config = make_config(architecture, "classification", num_epochs=2, model_options=options, batch_size=2)
write_config(config, root / "config.yaml")
rows = list(csv.DictReader(open(table)))
with open(root / "data" / "infer_in_image.csv", "w", newline="") as handle:  # the paths the container sees
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({**row, "Channel_0": "/data/" + Path(row["Channel_0"]).name} for row in rows)
print(table)
"""


def train_model(plan: Plan) -> str:
    """Data and config from gandlf_dimlift.synthetic; training by the host's gandlf_run, inference by its gandlf."""
    root = plan.work / "model"
    shutil.rmtree(root, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "GANDLF_DIMLIFT_DISABLE"} | CONTAINER_ENV
    table = run([plan.python, "-c", WRITE_MODEL_INPUTS, str(root), ARCHITECTURE, json.dumps(MODEL_OPTIONS)],
                env=env, quiet=True).stdout.strip().splitlines()[-1]
    bin_dir = Path(plan.python).parent
    config = str(root / "config.yaml")
    run([str(bin_dir / "gandlf_run"), "-c", config, "-i", table, "-m", str(root / "model_dir"), "-t", "True",
         "-rt", "True", "-d", "cpu"], log=plan.log("train"), env=env)
    checkpoint = root / "model_dir" / f"{ARCHITECTURE}_best.pth.tar"
    if not checkpoint.is_file():
        raise StepFailed(f"training wrote no {checkpoint.name}; see {plan.log('train')}")
    # GaNDLF writes into the model folder at inference: infer from a copy, the original is what gets embedded.
    shutil.copytree(root / "model_dir", root / "outside" / "model_dir")
    run([str(bin_dir / "gandlf"), "run", "--infer", "-c", config, "-i", table, "-m",
         str(root / "outside" / "model_dir"), "-o", str(root / "outside" / "out"), "-d", "cpu"],
        log=plan.log("infer-outside"), env=env)
    predictions = find_predictions(root / "outside" / "out")
    return f"{ARCHITECTURE} trained by gandlf_run (2 epochs, 6 subjects of 32^3); host predictions: {predictions}"


def deploy_model(plan: Plan, builder: Builder) -> str:
    root = plan.work / "model"
    builder.commit_with_files(plan.gandlf_image, [(root / "model_dir", "/embedded_model"),
                                                  (root / "config.yaml", "/embedded_config.yml")],
                              plan.deployed_image)
    return f"{plan.deployed_image} = {plan.gandlf_image} + /embedded_model + /embedded_config.yml"


def infer_in(plan: Plan, builder: Builder, image: str, name: str, check: bool) -> subprocess.CompletedProcess:
    """`gandlf run --infer` on the embedded model, with the data at /data and a fresh host folder at /out."""
    out = plan.work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = ["gandlf", "run", "--infer", "-c", "/embedded_config.yml", "-i", "/data/infer_in_image.csv",
               "-m", "/embedded_model", "-o", "/out", "-d", "cpu"]
    return builder.run_in(image, command, volumes=[(plan.work / "model" / "data", "/data"), (out, "/out")],
                          log=plan.log(name), check=check)


def check_rejected_without_plugin(plan: Plan, builder: Builder) -> str:
    result = infer_in(plan, builder, plan.deployed_image, "no-plugin", check=False)
    missing = [text for text in (*GANDLF_REJECTION, f"input_value='{ARCHITECTURE}'") if text not in result.stdout]
    if result.returncode == 0 or missing:
        raise StepFailed(f"the image without the plugin did not reject the config with GaNDLF's error (exit "
                         f"{result.returncode}, its output lacks {missing}); see {plan.log('no-plugin')}")
    error = next(line for line in result.stdout.splitlines() if GANDLF_REJECTION[0] in line)
    return f"rejected, exit {result.returncode}, GaNDLF's {error.strip()!r}: input_value='{ARCHITECTURE}'"


def build_layer(plan: Plan, builder: Builder) -> str:
    result = builder.build(DOCKERFILE, plan.work / "context", plan.tag, {"BASE_IMAGE": plan.deployed_image},
                           plan.log("layer"))
    ok = [line.strip() for line in result.stdout.splitlines() if line.startswith("gandlf-dimlift layer check OK")]
    if not ok:
        raise StepFailed(f"the build passed but printed no 'layer check OK'; see {plan.log('layer')}")
    say(f"    build-time check: {ok[-1]}")
    return f"{plan.tag} FROM {plan.deployed_image}"


def measure_layer(plan: Plan, builder: Builder) -> str:
    base, image = builder.layers(plan.deployed_image), builder.layers(plan.tag)
    if image[: len(base)] != base:
        raise StepFailed(f"{plan.tag} does not start with the layers of {plan.deployed_image}")
    added = image[len(base):]
    wheel = next((plan.work / "context" / "dist").glob("gandlf_dimlift-*.whl"))
    for size, created_by in added:  # the instruction without the build arguments and shell buildah prefix
        instruction = " ".join(created_by.split("/bin/sh -c ", 1)[-1].replace("#(nop) ", "").split())
        say(f"    {human(size):>10}  {instruction[:105]}{' ...' if len(instruction) > 105 else ''}")
    added_total, base_total = sum(s for s, _ in added), sum(s for s, _ in base)
    return (f"docker/Dockerfile added {len(added)} layers, {human(added_total)} (the wheel: "
            f"{human(wheel.stat().st_size)}); below them {human(base_total)}; image {human(base_total + added_total)}")


def check_registration_in_image(plan: Plan, builder: Builder) -> str:
    result = builder.run_in(plan.tag, ["python3.11", "/opt/gandlf-dimlift/check_registration.py"], quiet=True)
    return result.stdout.strip().splitlines()[-1]


VALIDATE = """
from GANDLF.config_manager import ConfigManager
model = ConfigManager("/embedded_config.yml")["model"]
print("GaNDLF's ConfigManager accepted /embedded_config.yml: architecture", model["architecture"],
      {k: model[k] for k in ("encoder_name", "encoder_depth", "pooling", "slice_axis") if k in model})
"""


def validate_config_in_image(plan: Plan, builder: Builder) -> str:
    return builder.run_in(plan.tag, ["python3.11", "-c", VALIDATE], quiet=True).stdout.strip().splitlines()[-1]


def infer_in_image(plan: Plan, builder: Builder) -> str:
    infer_in(plan, builder, plan.tag, "in-image", check=True)
    return f"predictions: {find_predictions(plan.work / 'out-in-image')}"


def find_predictions(folder: Path) -> Path:
    found = sorted(folder.rglob("final_preds_and_avg_probs*.csv"))
    if len(found) != 1:
        raise StepFailed(f"expected one final_preds_and_avg_probs.csv under {folder}, found {found}")
    return found[0]


def read_predictions(path: Path) -> dict[str, tuple[str, list[float]]]:
    """GaNDLF's prediction table: subject -> (predicted class, class probabilities)."""
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    classes = [c for c in rows[0] if c not in ("SubjectID", "PredictedClass")]
    return {r["SubjectID"]: (r["PredictedClass"], [float(r[c]) for c in classes]) for r in rows}


def compare_predictions(outside_csv: Path, inside_csv: Path, tolerance: float = TOLERANCE) -> str:
    """Compares two GaNDLF prediction tables; raises StepFailed unless classes agree and probabilities are close."""
    outside, inside = read_predictions(outside_csv), read_predictions(inside_csv)
    if sorted(outside) != sorted(inside):
        raise StepFailed(f"subjects differ: host {sorted(outside)}, image {sorted(inside)}")
    worst, same_class = 0.0, 0
    for subject in sorted(outside):
        (class_out, p_out), (class_in, p_in) = outside[subject], inside[subject]
        if len(p_out) != len(p_in):
            raise StepFailed(f"{subject}: {len(p_out)} class probabilities on the host, {len(p_in)} in the image")
        difference = max(abs(a - b) for a, b in zip(p_out, p_in, strict=True))
        worst, same_class = max(worst, difference), same_class + (class_out == class_in)
        say(f"    {subject}: host class {class_out} p={[f'{p:.6f}' for p in p_out]}, image class {class_in} "
            f"p={[f'{p:.6f}' for p in p_in]}, max |diff| {difference:.1e}")
    summary = (f"{same_class}/{len(outside)} predicted classes equal; max |p_image - p_host| = {worst:.1e} over "
               f"{len(outside)} subjects x {len(p_out)} classes (tolerance {tolerance:.0e})")
    if same_class != len(outside) or worst > tolerance:
        raise StepFailed(summary)
    return summary


def bad_input_checks(plan: Plan, builder: Builder) -> str:
    """The layer must fail its build naming the cause on three bad bases: no Python, no GaNDLF, GaNDLF 0.1.4."""
    standin_build(plan, builder, plan.python_image, target="python")  # cached layers of the stand-in build
    other = f"{IMAGE_PREFIX}/gandlf-0.1.4:check"
    pip = ["python3.11", "-m", "pip", "install", "--no-cache-dir", "--no-deps", "-q", "gandlf==0.1.4"]
    volumes = [(Path(plan.ca_bundle).resolve(), f"{CA_INSIDE}:ro")] if plan.ca_bundle else []
    if plan.ca_bundle:
        pip[4:4] = ["--cert", CA_INSIDE]
    # GaNDLF 0.1.4 over the stand-in's stack: --no-deps, so only GaNDLF's own package changes.
    builder.run_in(plan.gandlf_image, pip, volumes=volumes, commit_as=other, quiet=True)
    expectations = {
        plan.os_image: f"there is no python3.11 in the base image {plan.os_image}",
        plan.python_image: "gandlf (GaNDLF) is not installed in",
        other: f"requires gandlf=={plan.gandlf_version}, but the base image has GaNDLF 0.1.4",
    }
    try:
        for base, expected in expectations.items():
            name = "bad-base-" + base.rsplit("/", 1)[-1].replace(":", "-")
            result = builder.build(DOCKERFILE, plan.work / "context", f"{IMAGE_PREFIX}/must-fail:check",
                                   {"BASE_IMAGE": base}, plan.log(name), check=False)
            message = next((line for line in result.stdout.splitlines()
                            if line.startswith("gandlf-dimlift layer check FAILED")), "")
            if result.returncode == 0 or expected not in message:
                raise StepFailed(f"the layer FROM {base} should fail naming '{expected}'; exit "
                                 f"{result.returncode}, see {plan.log(name)}")
            say(f"    FROM {base}: the build failed (exit {result.returncode}): {message.strip()}")
    finally:
        for image in (f"{IMAGE_PREFIX}/must-fail:check", other, plan.python_image):
            builder.remove_image(image)
    return f"{len(expectations)} bad bases refused by the layer's own checks"


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the gandlf-dimlift deployment layer with a real image builder and check it inside.")
    parser.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; build nothing")
    parser.add_argument("--builder", choices=("auto", "docker", "buildah"), default="auto",
                        help="auto (default): Docker when its daemon answers, else buildah")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gandlf-dimlift-deploy"),
                        help="work folder: build context, root file system, model, predictions, logs")
    parser.add_argument("--os-image", help="a Debian bookworm image to build the stand-in from, e.g. "
                                           "debian:bookworm-slim (default: made offline with debootstrap)")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror for debootstrap ({DEFAULT_MIRROR})")
    parser.add_argument("--gandlf-version", default=required_gandlf_version(),
                        help="GaNDLF version of the stand-in: must be the one gandlf-dimlift requires")
    parser.add_argument("--torch-index", default="auto",
                        help=f"auto: {CPU_TORCH_INDEX} when it answers, else PyPI; pypi; or a wheel index URL")
    parser.add_argument("--ca-bundle", help="CA bundle for pip in the stand-in build (default: $PIP_CERT, "
                                            "$SSL_CERT_FILE or $REQUESTS_CA_BUNDLE; `none`: none)")
    parser.add_argument("--tag", help=f"name of the finished image (default {IMAGE_PREFIX}/gandlf-dimlift:VERSION)")
    parser.add_argument("--python", default=sys.executable,
                        help="host interpreter with GaNDLF and gandlf-dimlift (default: this one)")
    parser.add_argument("--bad-input-checks", action="store_true",
                        help="also check that the layer refuses bases without Python, without GaNDLF, "
                             "or with GaNDLF 0.1.4")
    parser.add_argument("--rebuild", action="store_true", help="make the OS and stand-in images anew if present")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    say("gandlf-dimlift deployment image: build and check" + (" (dry run: builds nothing)" if args.dry_run else ""))
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(Path(args.work).resolve() / "containers.conf"))
    steps = Steps(2 if args.dry_run else 15 if args.bad_input_checks else 14)
    plan: Plan | None = None
    try:
        def inputs() -> str:
            nonlocal plan
            plan = check_inputs(args)
            return print_plan(plan)

        steps("inputs", inputs)
        steps("builder", lambda: find_builder(plan, args.builder, env, args.dry_run))
        if args.dry_run:
            builder = plan.builder.name if plan.builder else "no builder (none usable here)"
            say(f"\nRESULT: dry run OK: the inputs are valid; a real run builds {plan.tag} with {builder}")
            return 0
        builder = plan.builder
        (plan.work / "logs").mkdir(parents=True, exist_ok=True)
        steps("wheel", lambda: build_wheel(plan))
        steps("os-image", lambda: make_os_image(plan, builder))
        steps("gandlf-image", lambda: build_gandlf_image(plan, builder))
        steps("model", lambda: train_model(plan))
        steps("deploy", lambda: deploy_model(plan, builder))
        steps("no-plugin", lambda: check_rejected_without_plugin(plan, builder))
        steps("layer", lambda: build_layer(plan, builder))
        steps("layer-size", lambda: measure_layer(plan, builder))
        steps("registration", lambda: check_registration_in_image(plan, builder))
        steps("validate", lambda: validate_config_in_image(plan, builder))
        steps("infer", lambda: infer_in_image(plan, builder))
        steps("compare", lambda: compare_predictions(find_predictions(plan.work / "model" / "outside" / "out"),
                                                     find_predictions(plan.work / "out-in-image")))
        if plan.bad_input_checks:
            steps("bad-inputs", lambda: bad_input_checks(plan, builder))
    except StepFailed as error:
        say(f"\nRESULT: FAILED: image {plan.tag if plan else args.tag or '(none)'}: {error}")
        return 1
    say("\nstep times: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.times)
        + f"; total {time.monotonic() - started:.1f} s")
    say(f"RESULT: PASSED: image {plan.tag} ({builder.name} {builder.version}): the plugin layer builds, and GaNDLF "
        "in it validates the plugin config and infers as on the host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
