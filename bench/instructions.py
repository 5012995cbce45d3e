"""``python -m bench.instructions``: CPU instructions per create, counted by callgrind.

On a shared 2-core host the clock is a poor yardstick: the same code's CPU time per create
wandered by 40 % between runs minutes apart, so an A/B of a few percent needs many
alternating pairs. Instructions executed do not wander: ``valgrind --tool=callgrind`` counts
the same total for the same code and inputs whatever the neighbours do. This script counts
the instructions *this Python process* executes for

1. ``--creates`` Patients created through the store (validation, indexing, the statement, the
   audit records queued in the same transaction), after a warm-up and with the heap frozen
   as the server freezes it at startup; and
2. the audit drain that turns their queued records into AuditEvent and Provenance resources,

and prints both per create. PostgreSQL's own work is not counted (it runs in its server
processes): this is the yardstick for the Python side of a change, the wrk runs of
``make bench`` for the whole. To compare two commits, run it in each (for the old one, a
``git worktree`` of it as the working directory and on ``PYTHONPATH``) and compare the counts;
one run each is enough.

It re-runs itself under valgrind (Debian package ``valgrind``) with instrumentation off, and
switches it on only around the measured parts (``callgrind_control``). The database given by
``--postgres-url`` is dropped and recreated.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import orjson

from bench.run import prepare_postgres

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/yilian_micro"
_CHILD = "YILIAN_INSTRUCTIONS_CHILD"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=500, help="Patients created while counting (default 500)")
    parser.add_argument("--warmup", type=int, default=200, help="Patients created before counting (default 200)")
    parser.add_argument("--postgres-url", default=DEFAULT_URL, help=f"dropped and recreated (default {DEFAULT_URL})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(_CHILD):
        return measure(args, Path(os.environ[_CHILD]))
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        print("bench.instructions needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="yilian-callgrind-") as work:
        out = Path(work) / "callgrind.out"
        command = [valgrind, "--quiet", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                   sys.executable, "-m", "bench.instructions", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(command, env={**os.environ, _CHILD: str(out)}, check=False).returncode


def measure(args: argparse.Namespace, out: Path) -> int:
    """In the child under valgrind: set up, then count the two parts."""
    from bench import data

    store, drain = _fresh_store(args.postgres_url)
    factory = data.PatientFactory(7)
    template = orjson.dumps(factory.template()).decode()
    bodies = [data.fill_placeholders(template, factory, area="110105").encode()
              for _ in range(args.warmup + args.creates)]
    from service.fhir.access import AccessContext

    ctx = AccessContext.internal("bench-instructions")
    for body in bodies[:args.warmup]:
        store.create(ctx, orjson.loads(body))
    drain(store)
    gc.collect()
    gc.freeze()  # as service.app does once the server has started

    _callgrind("-i", "on")
    for body in bodies[args.warmup:]:
        store.create(ctx, orjson.loads(body))
    _callgrind("-d")
    drained = drain(store)
    _callgrind("-d")

    creates, drain_total = _dumped_totals(out, 2)
    print(f"{args.creates} creates: {creates / args.creates / 1e6:.3f} M instructions per create (Python, this "
          f"process); audit drain: {drain_total / args.creates / 1e6:.3f} M per create ({drained} records)")
    return 0


def _fresh_store(url: str):  # type: ignore[no-untyped-def]
    """The store of an application on a freshly migrated ``url``, and the audit drain."""
    prepare_postgres(url)
    env = {**os.environ, "YILIAN_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    os.environ.update(YILIAN_DATABASE_URL=url, YILIAN_AUDIT_DRAIN_INTERVAL_MS="0", YILIAN_LOG_LEVEL="warning")
    from service.app import create_app
    from service.security.audit import drain

    return create_app().state.store, drain


def _callgrind(*arguments: str) -> None:
    """Ask callgrind to switch instrumentation (``-i on``) or dump its counts (``-d``), and
    wait until it has: it acts when this process next runs code, so we keep running some."""
    command = subprocess.Popen(["callgrind_control", *arguments, str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while command.poll() is None:
        sum(range(1000))


def _dumped_totals(out: Path, count: int) -> list[int]:
    """The instruction totals of the first ``count`` dumps (one file per dump, in order)."""
    for _ in range(1000):
        files = sorted(glob.glob(f"{out}.{os.getpid()}.*"), key=lambda f: int(f.rsplit(".", 1)[1]))
        if len(files) >= count:
            break
        sum(range(100_000))  # the dump is written while this process runs code
    else:
        raise RuntimeError(f"callgrind wrote {len(files)} of {count} dumps ({out}.{os.getpid()}.*)")
    totals = []
    for path in files[:count]:
        with open(path, encoding="utf-8") as dump:
            totals.append(int(next(line for line in dump if line.startswith("summary:")).split()[1]))
    return totals


if __name__ == "__main__":
    sys.exit(main())
