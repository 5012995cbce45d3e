"""The official FHIR R4 examples (npm ``hl7.fhir.r4.examples@4.0.1``), fetched once into .cache/."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

PACKAGE = "hl7.fhir.r4.examples@4.0.1"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "npm"


def package_dir() -> Path:
    """Extracted package directory; fetched with ``npm pack`` on first use."""
    target = CACHE / "hl7.fhir.r4.examples-4.0.1" / "package"
    if target.is_dir():
        return target
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to fetch the FHIR R4 examples package", pytrace=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "hl7.fhir.r4.examples-4.0.1.tgz"
    if not tarball.exists():
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=CACHE, check=True, capture_output=True)
    partial = CACHE / "hl7.fhir.r4.examples-4.0.1.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    partial.rename(target.parent)
    return target


def examples(*, per_type: int | None = None, skip_types: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict]]:
    """(file name, resource) for the package's resources, ``per_type`` at most of each type."""
    counts: dict[str, int] = {}
    for path in sorted(package_dir().glob("*.json")):
        if path.name in ("package.json", ".index.json"):
            continue
        resource = orjson.loads(path.read_bytes())
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str) or resource_type in skip_types:
            continue
        counts[resource_type] = counts.get(resource_type, 0) + 1
        if per_type is not None and counts[resource_type] > per_type:
            continue
        yield path.name, resource
