"""wrk: install it when missing, run it with our Lua scripts, parse what it prints.

Every run is bounded: wrk stops by itself after ``duration`` seconds, each request times out
after ``--timeout``, and the subprocess is killed if it outlives ``duration`` by a margin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent / "lua"
MAX_THREADS = 16  # bench/lua/post.lua keeps resident IDs unique for up to 16 threads
INSTALL_HINT = "install it with: apt-get update && apt-get install -y wrk (Debian/Ubuntu)"


class WrkError(RuntimeError):
    pass


def ensure_wrk() -> str:
    """The path of wrk; installs the Debian package when missing and we may (root, apt-get)."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "apt-get is not available" if apt is None else "not running as root"
        raise WrkError(f"wrk is not installed and cannot be installed here ({why}); {INSTALL_HINT}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("wrk not found: running `apt-get install -y wrk`", flush=True)
    if subprocess.run([apt, "install", "-y", "wrk"], env=env, timeout=600, check=False).returncode != 0:
        print("apt-get install failed: running `apt-get update`, then `apt-get install -y wrk` again", flush=True)
        subprocess.run([apt, "update"], env=env, timeout=600, check=False)
        subprocess.run([apt, "install", "-y", "wrk"], env=env, timeout=600, check=False)
    found = shutil.which("wrk")
    if not found:
        raise WrkError(f"wrk could not be installed; {INSTALL_HINT}")
    print(f"wrk installed: {found}", flush=True)
    return found


def build_script(name: str, directory: Path) -> Path:
    """``bench/lua/stats.lua`` + ``bench/lua/<name>.lua`` as one script file in ``directory``."""
    text = (LUA_DIR / "stats.lua").read_text(encoding="utf-8") + "\n" + (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
    path = directory / f"{name}.lua"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float | None
    p99_ms: float
    max_ms: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: str | None = None
    output: str = ""

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not 200 <= code <= 299)

    @property
    def socket_errors(self) -> int:
        """Connect/read/write errors and timeouts (``status`` errors are counted in non_2xx)."""
        return sum(n for kind, n in self.errors.items() if kind != "status")

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.non_2xx == 0 and self.socket_errors == 0


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m|h)\s*$")


def _to_ms(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse wrk's output: the ``@@BENCH`` line of bench/lua/stats.lua when present (exact
    counts and percentiles), else wrk's own summary with ``--latency``."""
    bench = next((line[len("@@BENCH "):] for line in text.splitlines() if line.startswith("@@BENCH ")), None)
    sample = next((line[len("@@SAMPLE "):] for line in text.splitlines() if line.startswith("@@SAMPLE ")), None)
    if bench is not None:
        data = json.loads(bench)
        lat = data["latency_us"]
        duration_s = data["duration_us"] / 1e6
        requests = int(data["requests"])
        return WrkResult(
            requests=requests, duration_s=duration_s,
            requests_per_s=requests / duration_s if duration_s > 0 else 0.0,
            p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000, p99_ms=lat["p99"] / 1000, max_ms=lat["max"] / 1000,
            statuses={int(code): int(n) for code, n in data["statuses"].items()},
            errors={k: int(v) for k, v in data["errors"].items()}, error_sample=sample, output=text,
        )
    return _parse_plain(text, sample)


def _parse_plain(text: str, sample: str | None) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", text, re.MULTILINE)
    if not rps or not total:
        raise WrkError("cannot parse wrk output:\n" + text[-2000:])
    percentiles = {int(p): _to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.MULTILINE)}
    if 50 not in percentiles or 99 not in percentiles:
        raise WrkError("wrk output has no latency distribution (run it with --latency):\n" + text[-2000:])
    requests = int(total.group(1))
    errors: dict[str, int] = {}
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True))
    statuses: dict[int, int] = {}
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non_ok:
        statuses[0] = int(non_ok.group(1))  # wrk does not say which statuses: 0 stands for "some"
    statuses[200] = requests - sum(statuses.values())
    max_match = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.MULTILINE)
    return WrkResult(
        requests=requests, duration_s=_to_ms(total.group(2)) / 1000, requests_per_s=float(rps.group(1)),
        p50_ms=percentiles[50], p90_ms=percentiles.get(90), p99_ms=percentiles[99],
        max_ms=_to_ms(max_match.group(1)) if max_match else None,
        statuses=statuses, errors=errors, error_sample=sample, output=text,
    )


def run_wrk(wrk: str, url: str, script: Path, script_args: list[str], *, duration: float, connections: int,
            threads: int = 1, timeout_s: float = 10.0, headers: dict[str, str] | None = None) -> WrkResult:
    threads = max(1, min(threads, connections, MAX_THREADS))
    header_args = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
               f"--timeout={max(1, round(timeout_s))}s", "--latency", *header_args, "-s", str(script), url,
               "--", *script_args]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + timeout_s + 30,
                                   check=False)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish in time: {_shown(command)}") from exc
    output = completed.stdout + (("\n" + completed.stderr) if completed.stderr.strip() else "")
    if completed.returncode != 0:
        raise WrkError(f"wrk exited with {completed.returncode}: {_shown(command)}\n{output[-2000:]}")
    return parse_wrk_output(output)


def _shown(command: list[str]) -> str:
    """The command line for a message, without the bearer token."""
    return " ".join("Authorization: Bearer …" if arg.startswith("Authorization:") else arg for arg in command)
