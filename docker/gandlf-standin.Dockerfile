# A stand-in for the image `gandlf deploy` builds, for checking the plugin layer where GaNDLF's images cannot be had.
#
# GaNDLF's Dockerfile-CPU (which `gandlf deploy` builds through mlcube_docker) is Ubuntu 22.04 with python3.11
# from a PPA, a CPU-only torch from PyTorch's wheel index, GaNDLF pip-installed into python3.11, the entrypoint
# `gandlf` with `run` as its default argument, and an /embedded_model folder that `gandlf deploy` fills. This file
# reproduces what the plugin layer relies on (python3.11 with pip, GaNDLF in its site-packages, the entrypoint, the
# embed folder) on Debian bookworm, whose own python3 is 3.11. docker/build_and_check.py builds it; by hand:
#
#   docker build -f docker/gandlf-standin.Dockerfile --build-arg OS_IMAGE=debian:bookworm-slim -t gandlf-standin .
#
# Stages: `python` (the OS with python3.11 and pip, no GaNDLF: the "base image without GaNDLF" of the bad-input
# checks) and `gandlf` (the stand-in itself, the last stage).

# Any Debian bookworm image: debian:bookworm-slim, or one made offline with debootstrap (build_and_check.py does).
ARG OS_IMAGE=debian:bookworm-slim

FROM ${OS_IMAGE} AS python
# libgl1/libglib2.0-0: opencv-python (a GaNDLF dependency) loads them on import.
# GaNDLF's images pip-install into a system python3.11 that is not marked externally managed; Debian marks its
# python3.11 as managed by apt (PEP 668), which would stop `pip install` in this and later layers: unmark it.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3.11 python3-pip ca-certificates libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED

FROM python AS gandlf
ARG GANDLF_VERSION=0.1.5
# GaNDLF 0.1.5 pins torch==2.7.1. Empty: torch from PyPI (on Linux x86_64 the CUDA build with its nvidia-*
# libraries, several GB); a wheel index such as https://download.pytorch.org/whl/cpu gives the CPU-only build.
ARG TORCH_INDEX_URL=
# A CA bundle for pip, for networks that intercept TLS: a path that exists during the build only
# (build_and_check.py mounts the host's bundle there with buildah's --volume); nothing is copied into the image.
# PIP_CERT rather than --cert, so that pip's build-isolation subprocesses use it too.
ARG CA_BUNDLE=
RUN if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
        python3.11 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.7.1 torchvision==0.22.1; \
    fi \
    && python3.11 -m pip install --no-cache-dir "gandlf==${GANDLF_VERSION}" \
    && mkdir -p /embedded_model
# Exec form: `docker run IMAGE run --infer ...` passes its arguments to gandlf. (GaNDLF's own Dockerfiles use the
# shell form `ENTRYPOINT gandlf`, which ignores them; MLCube sets each task's entrypoint itself.)
ENTRYPOINT ["gandlf"]
CMD ["run"]
