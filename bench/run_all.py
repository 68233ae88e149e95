"""Run every bench/bench_*.py as a subprocess and print a summary table.

By default each benchmark runs in its smoke form (--quick where the script has it, else
the small sizes in QUICK_FALLBACK) and, where the script takes --out, writes its JSON
under bench/results/quick/ so the committed full results stay untouched. --full runs
the full sizes into bench/results/. A quick run of a script without --out (it writes
into bench/results/ itself) has its JSON moved to bench/results/quick/ and the full
result it replaced put back. Extra arguments are passed through to every
script whose --help lists the option (e.g. --threads 2, --adult-dir DIR); a script
that needs an option nobody gave (bench_fairness_adult's --adult-dir) is skipped.

    python bench/run_all.py [--full] [--only NAME ...] [--timeout S] [extra args...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
QUICK_DIR = BENCH / "results" / "quick"
# Smoke-sized arguments for benchmarks without a --quick flag.
QUICK_FALLBACK: dict[str, list[str]] = {
    "bench_api": ["--submits", "20", "--poll-seconds", "1", "--concurrency", "4"],
    "bench_uploads": ["--rows", "2000", "--repeats", "2"],
}
# Options a script cannot run without, and where its results land if it has no --out.
REQUIRED = {"bench_fairness_adult": "--adult-dir"}
DEFAULT_RESULTS = {"bench_api": "api.json"}
# Keys of a result JSON worth one line in the summary (ratios and headline numbers).
# Matched against the dotted path of a value, e.g. runs.0.ratios.fused / fwd_rev.
HEADLINE = re.compile(r"(^|[._])ratios?([._]|$)|_over_|spearman| / ", re.IGNORECASE)


def _options_of(name: str) -> set[str]:
    """The long options a script's --help lists (empty if --help fails)."""
    out = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def _groups(extra: list[str]) -> list[list[str]]:
    """Split pass-through arguments into [--option, values...] groups."""
    groups: list[list[str]] = []
    for arg in extra:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def _headlines(payload: Any, prefix: str = "") -> list[str]:
    """`key=value` for numeric headline entries of a result JSON (depth-first, few)."""
    found: list[str] = []
    if isinstance(payload, dict):
        for key, value in payload.items():
            path = f"{prefix}{key}"
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and HEADLINE.search(path):
                found.append(f"{path}={value:.3g}")
            elif isinstance(value, (dict, list)):
                found.extend(_headlines(value, f"{path}."))
    elif isinstance(payload, list):
        for i, value in enumerate(payload[:4]):
            found.extend(_headlines(value, f"{prefix}{i}."))
    return found


def _keep_full_result(written: Path, kept: bytes | None, name: str) -> Path | None:
    """Move a quick run's JSON to bench/results/quick/ and restore the full one."""
    moved = None
    if written.exists() and (kept is None or written.read_bytes() != kept):
        QUICK_DIR.mkdir(parents=True, exist_ok=True)
        moved = QUICK_DIR / f"{name}.json"
        moved.write_bytes(written.read_bytes())
    if kept is not None:
        written.write_bytes(kept)
    elif moved is not None:
        written.unlink()
    return moved


def _command(name: str, options: set[str], full: bool, extra: list[list[str]]
             ) -> tuple[list[str] | None, Path | None, str]:
    """The argv for one benchmark, its result path and a note (None argv: skip)."""
    argv = [sys.executable, "-m", f"bench.{name}"]
    note = ""
    if not full:
        if "--quick" in options:
            argv.append("--quick")
        elif name in QUICK_FALLBACK:
            argv += QUICK_FALLBACK[name]
            note = "small sizes (no --quick)"
        else:
            note = "full size (no --quick)"
    passed = [g for g in extra if g[0].split("=")[0] in options]
    for group in passed:
        argv += group
    required = REQUIRED.get(name)
    if required and not any(g[0].split("=")[0] == required for g in passed):
        return None, None, f"skipped: needs {required}"

    result: Path | None = None
    if "--out" in options and not any(g[0].split("=")[0] == "--out" for g in passed):
        result = (QUICK_DIR if not full else BENCH / "results") / f"{name}.json"
        argv += ["--out", str(result)]
    elif name in DEFAULT_RESULTS:
        result = BENCH / "results" / DEFAULT_RESULTS[name]
    else:
        result = BENCH / "results" / f"{name}.json"
    return argv, result, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full sizes into results/")
    parser.add_argument("--only", nargs="+", default=None, help="benchmark names to run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args, extra = parser.parse_known_args()

    names = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}; have {', '.join(names)}")
        names = [n for n in names if n in args.only]
    groups = _groups(extra)

    rows: list[tuple[str, str, str, str, str]] = []
    for name in names:
        options = _options_of(name)
        argv, result, note = _command(name, options, args.full, groups)
        if argv is None:
            rows.append((name, "skipped", "-", "-", note))
            continue
        print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
        before = result.stat().st_mtime if result and result.exists() else None
        kept = result.read_bytes() if result and before is not None else None
        start = time.perf_counter()
        try:
            code = subprocess.run(argv, cwd=ROOT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = -1
            note = f"timed out after {args.timeout:.0f} s"
        wall = time.perf_counter() - start
        if result and not args.full and not result.is_relative_to(QUICK_DIR):
            result = _keep_full_result(result, kept, name)
            before = None

        headline = ""
        if code == 0 and result and result.exists() and result.stat().st_mtime != before:
            try:
                headline = "; ".join(_headlines(json.loads(result.read_text()))[:4])
            except (OSError, ValueError) as exc:
                headline = f"unreadable result: {exc}"
        status = "ok" if code == 0 else ("timeout" if code == -1 else f"failed ({code})")
        shown = str(result.relative_to(ROOT)) if result and code == 0 else "-"
        rows.append((name, status, f"{wall:.1f}", shown, "; ".join(x for x in (note, headline)
                                                                      if x)))

    header = ("benchmark", "status", "wall s", "result", "notes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print("\nSummary")
    print("  ".join(h.ljust(w) for h, w in zip(header[:4], widths, strict=True)) + "  notes")
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0 if all(r[1] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
