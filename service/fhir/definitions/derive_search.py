"""Derive ``search_parameters.json`` from the official FHIR R4 package.

    python -m service.fhir.definitions.derive_search [--package-dir DIR]

The R4 search parameters come from ``Bundle-searchParams.json`` of the npm package
``hl7.fhir.r4.examples@4.0.1`` (the spec's own registry: 1,375 definitions, none of the
package's example or extension-defined parameters). The package is fetched with ``npm pack``
into ``.cache/npm/`` and unpacked there the first time; the output is committed, so the server
and CI never need npm.

Output shape, one parameter per line so diffs stay readable::

    {"Patient": {"name": {"type": "string", "expression": "Patient.name", "url": ..., "description": ...}, ...},
     "Resource": {"_id": {..., "column": true}, "_tag": {...}, ...}}

Each expression holds only the union members for that type (``Patient.name`` out of
``Patient.name | Practitioner.name | ...``); a reference whose members all say
``where(resolve() is X)`` gets ``target: [X]``, a Reference(Any) is written ``target: ["Any"]``
(expanded again by the registry); composites list their ``components``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from service.fhir.searchparams import ANY_TARGET, ANY_TARGETS, COMMON, SearchParam, params_from_resource

PACKAGE = "hl7.fhir.r4.examples"
VERSION = "4.0.1"
REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE_DIR = REPO_ROOT / ".cache" / "npm"
OUTPUT = Path(__file__).parent / "search_parameters.json"

#: The Resource-level parameters we serve. _content, _query and DomainResource's _text have no
#: expression (full text and named queries are not supported) and are left out.
COMMON_CODES = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")


def package_dir(cache_dir: Path | None = None) -> Path:
    """The unpacked package (its ``package/`` folder), fetching it with ``npm pack`` if missing.

    ``YILIAN_NPM_CACHE`` overrides the cache folder. Shares the layout of derive_validation, so
    either script's download serves both.
    """
    cache_dir = Path(os.environ.get("YILIAN_NPM_CACHE", cache_dir or CACHE_DIR))
    target = cache_dir / f"{PACKAGE}-{VERSION}"
    if (target / "package" / "package.json").exists():
        return target / "package"
    tarball = cache_dir / f"{PACKAGE}-{VERSION}.tgz"
    if not tarball.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(cache_dir), "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    partial = cache_dir / f"{PACKAGE}-{VERSION}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(partial, filter="data")
    try:
        partial.rename(target)  # appear complete or not at all
    except OSError:  # another process unpacked it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "package" / "package.json").exists():
            raise
    return target / "package"


def core_search_parameters(pkg: Path) -> list[dict[str, Any]]:
    """The SearchParameter resources of the spec's registry bundle."""
    bundle = json.loads((pkg / "Bundle-searchParams.json").read_text(encoding="utf-8"))
    return [e["resource"] for e in bundle["entry"] if e.get("resource", {}).get("resourceType") == "SearchParameter"]


def _as_json(p: SearchParam) -> dict[str, Any]:
    d: dict[str, Any] = {"type": p.type}
    if p.expression:
        d["expression"] = p.expression
    if p.targets:
        d["target"] = [ANY_TARGET] if set(p.targets) >= set(ANY_TARGETS) else list(p.targets)
    if p.components:
        d["components"] = [{"code": c.code, "expression": c.expression} for c in p.components]
    if p.column:
        d["column"] = True
    d["url"] = p.url
    d["description"] = p.description
    return d


def derive(search_parameters: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{ResourceType: {code: definition}} plus "Resource" for the common parameters."""
    codes_by_url = {sp["url"]: sp["code"] for sp in search_parameters}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sp in search_parameters:
        if "DomainResource" in sp["base"]:
            continue
        if COMMON in sp["base"] and sp["code"] not in COMMON_CODES:
            continue
        if not sp.get("expression"):
            continue
        for p in params_from_resource(sp, source=sp["id"], codes_by_url=codes_by_url):
            out.setdefault(p.base, {})[p.code] = _as_json(p)
    return {rt: dict(sorted(params.items())) for rt, params in sorted(out.items())}


def dumps(definitions: dict[str, dict[str, dict[str, Any]]]) -> str:
    """JSON with one parameter per line."""
    lines = ["{"]
    types = list(definitions)
    for i, rt in enumerate(types):
        lines.append(f" {json.dumps(rt)}: {{")
        codes = list(definitions[rt])
        for j, code in enumerate(codes):
            body = json.dumps(definitions[rt][code], ensure_ascii=False, separators=(",", ":"))
            lines.append(f"  {json.dumps(code)}: {body}{',' if j < len(codes) - 1 else ''}")
        lines.append(" }" + ("," if i < len(types) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package-dir", type=Path, help="an unpacked package/ folder (default: fetch into .cache/npm)")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    args = ap.parse_args(argv)
    pkg = args.package_dir or package_dir()
    definitions = derive(core_search_parameters(pkg))
    args.output.write_text(dumps(definitions), encoding="utf-8")
    n = sum(len(v) for v in definitions.values())
    print(f"wrote {n} parameters for {len(definitions)} types to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
