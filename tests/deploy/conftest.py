"""The deployment recipes: the container image (deploy/Containerfile, built for real by
scripts/build-image with podman) and the Kubernetes manifests (deploy/kubernetes, checked
by kubecheck, Kubernetes' own create validation, built by scripts/kube-tools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


BUILD_IMAGE_TIMEOUT = 1500  # a first build here: 97-212 s, most of it mmdebstrap
KUBE_TOOLS_TIMEOUT = 2700  # a first build here: about 17 min (kubecheck, kube-apiserver, etcd)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test of this tier that needs the image, or the Kubernetes tools, waits for
    their build too: give it that time on top of pytest's per-test timeout."""
    here = Path(__file__).parent
    for fixture, seconds in (("image", BUILD_IMAGE_TIMEOUT), ("kube_bin", KUBE_TOOLS_TIMEOUT)):
        for item in items:
            if here in item.path.parents and fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.timeout(seconds + 120))
                break


def _script(name: str, *args: str, timeout: float) -> tuple[str, str]:
    """Runs scripts/NAME; its last stdout line and its stderr. Fails with its stderr."""
    done = subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"scripts/{name} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.fixture(scope="session")
def image() -> str:
    """localhost/tokenwire:<version>, built now from this tree. Building needs Linux and
    root (mmdebstrap, podman's rootful store): anywhere else the image tests are skipped
    with that reason; everything else that goes wrong fails."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"building the image needs Linux (podman, mmdebstrap); this is {sys.platform}")
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (mmdebstrap and podman's rootful store); "
                    f"running as uid {os.geteuid()}")
    started = time.monotonic()
    name, log = _script("build-image", timeout=BUILD_IMAGE_TIMEOUT)
    print(f"\nscripts/build-image: {time.monotonic() - started:.0f} s\n{log}")
    return name


@pytest.fixture(scope="session")
def podman_args() -> list[str]:
    line, _ = _script("podman-args", timeout=30)
    return line.split()


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    """The directory of kubecheck, kube-apiserver and etcd (scripts/kube-tools)."""
    bin_dir, _ = _script("kube-tools", timeout=KUBE_TOOLS_TIMEOUT)
    return Path(bin_dir)


@pytest.fixture(scope="session")
def kubecheck(kube_bin: Path) -> Path:
    return kube_bin / "kubecheck"


@pytest.fixture(scope="session")
def objects(kubecheck: Path) -> list[dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml as the API server would store it: decoded
    strictly, defaulted, validated (kubecheck -dump)."""
    done = subprocess.run([str(kubecheck), "-dump", *map(str, MANIFESTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} in deploy/kubernetes"
    return matches[0]
