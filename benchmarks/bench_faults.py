"""The fault benchmark: every failure case the toolkit claims to survive, run for real, in one table.

    python -m benchmarks.bench_faults [--only training,serving,memory] [--workdir DIR]

Each area runs its cases as real processes against a store in a temporary folder and reports,
per case, what happened, whether anything was lost (checkpoints loadable, metric steps
contiguous, no request of a well-behaved client failed) and the time to recover:
    training  benchmarks/fault_training.py: a fresh store opened by two processes, two resumes of
              one run, a 403 on a checkpoint upload, a truncated best.pt, both last.pt copies
              corrupt, a full disk, SIGTERM then resume, a rank that raises under torchrun
    serving   benchmarks/fault_serving.py: oversized requests, overload past the in-flight bound,
              a request past its time limit, an internal error; then 8 clients for 30 s
              (images/s, p50/p99 latency, /ping p99, failed normal requests)
    memory    benchmarks/fault_memory.py: a decompression bomb refused or skipped; peak memory
              of quantizing and of judging quality at 1x and 4x the data
"""

import argparse
import importlib
import tempfile
import time
from pathlib import Path

AREAS = ("training", "serving", "memory")


def print_table(rows):
    header = ("case", "what happened", "lost", "recovery")
    cells = [header] + [(r["case"], r["outcome"], r["lost"],
                         "-" if r.get("recover_s") is None else f"{r['recover_s']:.1f} s")
                        for r in rows]
    widths = [min(70, max(len(str(c[i])) for c in cells)) for i in range(4)]
    for i, row in enumerate(cells):
        print("  ".join(str(c)[:70].ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_faults",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(AREAS),
                        help="comma-separated areas: " + ", ".join(AREAS))
    parser.add_argument("--workdir", help="keep the stores and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    areas = [a for a in args.only.split(",") if a]
    unknown = set(areas) - set(AREAS)
    if unknown:
        parser.error(f"unknown area(s): {', '.join(sorted(unknown))}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="faults-"))
    rows, extras = [], []
    started = time.perf_counter()
    for area in areas:
        module = importlib.import_module(f"benchmarks.fault_{area}")
        workdir = root / area
        workdir.mkdir(parents=True, exist_ok=True)
        area_start = time.perf_counter()
        rows += [{**row, "case": f"{area}: {row['case']}"} for row in module.cases(workdir)]
        if area == "serving":
            extras.append(("serving under load", module.load(workdir)))
        if area == "memory":
            extras.append(("peak memory", module.memory(workdir)))
        print(f"[{area}] {time.perf_counter() - area_start:.0f} s", flush=True)
    print()
    print_table(rows)
    for title, figures in extras:
        print(f"\n{title}:")
        if isinstance(figures, dict):
            for key, value in figures.items():
                print(f"  {key}: {value}")
        else:
            for row in figures:
                print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    lost = [r["case"] for r in rows if r["lost"] != "nothing"]
    print(f"\n{len(rows)} cases in {time.perf_counter() - started:.0f} s; "
          + (f"something lost in: {', '.join(lost)}" if lost else "nothing lost in any"))
    print(f"stores and logs: {root}")


if __name__ == "__main__":
    main()
