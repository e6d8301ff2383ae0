"""Time from starting a resumed dump-teacher to its first new batch: kill a dump once `--after` samples are
committed, rerun the same command, and time the rerun from launch until it logs its first batch.

    python benchmarks/resume.py --out runs/bench/resume -- --teacher resnet20 --weights W \\
        --data imagefolder:data/cifar10-jpeg --views 2
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from softcache.store import committed_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--after", type=int, default=10000, help="kill once this many samples are committed")
    parser.add_argument("dump_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    command = [sys.executable, "-m", "softcache", "-v", "dump-teacher", *[a for a in args.dump_args if a != "--"],
               "--out", str(args.out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if committed_samples(args.out) >= args.after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = committed_samples(args.out)
    started = time.perf_counter()
    rerun = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in rerun.stderr:
        if "first batch" in line:
            elapsed = time.perf_counter() - started
            break
    rerun.send_signal(signal.SIGKILL)
    rerun.wait()
    print(f"killed with {committed} samples committed; the rerun computed its first new batch "
          f"({line.split(': ', 1)[-1].strip()}) {elapsed:.2f} s after launch")


if __name__ == "__main__":
    main()
