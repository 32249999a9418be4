"""Run the whole test suite: one pytest process per Keras flavour and backend.

Usage:
    python -m tests                      # every flavour and backend, in turn
    python -m tests --only keras3:jax    # one of them
    python -m tests -- -k plan -x        # extra arguments after ``--`` go to every pytest

Keras reads ``KERAS_BACKEND`` when it is imported, so each flavour/backend
gets a process of its own (``KERAS_REBUILD_FLAVOUR`` tells tests/conftest.py
which one it is). The processes run one after another, each with pytest-xdist
on every core; the exit status is non-zero when any of them fails or runs no
test, and the last line totals the counts.
"""
import argparse
import os
import re
import subprocess
import sys
import time

RUNS = ["tf_keras", "keras3:tensorflow", "keras3:jax", "keras3:torch"]
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")
SUMMARY = re.compile(r"^=+ .*\b(passed|failed|errors?|no tests ran)\b.* in [\d.]+s.* =+$")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m tests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("-n", "--workers", default=str(os.cpu_count() or 2),
                        help="pytest-xdist workers per process (default: every core)")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_runs = []
    for run in args.only.split(","):
        if run not in RUNS:
            parser.error(f"expected --only to name some of {RUNS}; received {run!r}")
        flavour, _, backend = run.partition(":")
        env = dict(os.environ, KERAS_REBUILD_FLAVOUR=flavour, KERAS_BACKEND=backend or "tensorflow",
                   TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                   # one pytest-xdist worker per core: threads beyond that only contend
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "pytest", "-n", args.workers, "-p", "no:cacheprovider", *extra]
        print(f"\n=== {run}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        summary = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            if SUMMARY.match(line.strip()):
                summary = line  # pytest's closing line, e.g. "=== 12 passed, 1 skipped in 3.2s ==="
        code = proc.wait()
        counts = {kind: 0 for kind in totals}
        for number, kind in COUNT.findall(summary):
            kind = "errors" if kind.startswith("error") else kind
            if kind in counts:
                counts[kind] += int(number)
        for kind in totals:
            totals[kind] += counts[kind]
        print(f"=== {run}: exit {code} in {time.monotonic() - start:.0f} s", flush=True)
        if code != 0 or counts["passed"] == 0:
            failed_runs.append(run)
    print(f"\nruns failed: {', '.join(failed_runs) or 'none'}")
    print(f"{totals['passed']} passed, {totals['failed'] + totals['errors']} failed, {totals['skipped']} skipped")
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
