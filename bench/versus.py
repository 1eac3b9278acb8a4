"""Run a benchmark against the server of another revision and this checkout's, alternated.

    python bench/versus.py setup REV                 # once: REV's code in a venv of its own
    python bench/versus.py run REV [--times 3] -- bench/heartbeats.py --rounds 1 --duration 8

`setup` exports REV (`git archive`) to $TMPDIR/discovery-versus/<commit>/src and installs it,
with its dependencies, into a venv beside it; that is the only step that installs anything.
`run` runs the benchmark TIMES times for each side, alternating which goes first, with
$BENCH_SERVER_PYTHON set to that venv's Python for the old side (bench/machine.py: every bench
starts `discovery serve` through it) and unset for the new one. Each run's output is printed
under a header naming the side, and kept in --out. The bench itself, its client and its peers
(etcd, dnsmasq, dnsperf) are the same on both sides; only the server's code differs.
Pass --no-docs to benches that would otherwise rewrite docs/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import SERVER_PYTHON

ROOT = Path(__file__).resolve().parent.parent


def commit_of(revision: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", f"{revision}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def home(commit: str) -> Path:
    return Path(tempfile.gettempdir()) / "discovery-versus" / commit


def setup(revision: str) -> int:
    commit = commit_of(revision)
    where = home(commit)
    src, venv = where / "src", where / "venv"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)], check=True
    )
    print(f"{revision} ({commit}) installed in {venv}")
    return 0


def run(revision: str, times: int, out: Path, bench: list[str]) -> int:
    commit = commit_of(revision)
    python = home(commit) / "venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            f"no venv for {commit}: run `python bench/versus.py setup {revision}` first"
        )
    if not bench:
        raise SystemExit("nothing to run: give the bench after --")
    out.mkdir(parents=True, exist_ok=True)
    head = commit_of("HEAD")
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    sides = {f"old {commit}": str(python), f"new {head}{' + changes' if dirty else ''}": ""}
    print(f"# {' '.join(bench)}: {times} runs a side, alternated; load {os.getloadavg()}")
    for round_ in range(times):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            env = dict(os.environ)
            env.pop(SERVER_PYTHON, None)
            if sides[side]:
                env[SERVER_PYTHON] = sides[side]
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, *bench], cwd=ROOT, env=env, capture_output=True, text=True
            )
            log = out / f"{round_ + 1}-{side.split()[0]}.log"
            log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
            took = time.monotonic() - started
            print(f"\n## round {round_ + 1}, {side} (exit {done.returncode}, {took:.0f} s, {log})")
            print(done.stdout.rstrip())
            if done.returncode != 0:
                print(done.stderr[-2000:].rstrip())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup").add_argument("revision")
    runner = commands.add_parser("run")
    runner.add_argument("revision")
    runner.add_argument("--times", type=int, default=3)
    runner.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "versus-runs")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    if args.command == "setup":
        return setup(args.revision)
    return run(args.revision, args.times, args.out, argv[cut + 1 :])


if __name__ == "__main__":
    raise SystemExit(main())
