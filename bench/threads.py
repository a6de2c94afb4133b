"""Which --threads default serves a 2-core machine: whole commands timed per thread setting, interleaved,
on a quiet machine and with another job holding a core (--busy), side by side in one run.

    python -m bench.threads --repeats 15 --busy 0,1 -o reports/threads

Settings (each a fresh `griffin-export` process):
- 1 thread: --threads 1;
- all cores, spinning: torch's default threads, OMP_WAIT_POLICY=ACTIVE (OpenMP workers spin between
  parallel regions: what torch did before the CLI set a policy);
- all cores, passive: torch's default threads, OMP_WAIT_POLICY=PASSIVE (the CLI's default since).
Jobs: `generate BUNDLE --max-new-tokens 64` (the decode rate it prints), and the quick-start export of
samples/prompt.txt (seconds, the whole process). --busy N starts N background processes, each a
1-thread matmul loop: another job on the machine. Prints the median and min-max of each figure and the
ratio of each setting to the default per repeat (paired: a repeat runs every setting back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "1 thread": (["--threads", "1"], {}),
    "all cores, spinning": ([], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "all cores, passive (default)": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}
DEFAULT = "all cores, passive (default)"
BUSY_LOOP = "import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\nwhile True:\n    x = (x @ x).tanh()\n"
PROMPT = Path(__file__).resolve().parent.parent / "samples" / "prompt.txt"


def griffin(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stderr) of one griffin-export process."""
    t0 = time.perf_counter()
    p = subprocess.run(["griffin-export", *args], env={**os.environ, **env}, capture_output=True, text=True,
                       check=False)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"griffin-export {' '.join(args)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return seconds, p.stderr


def decode_rate(stderr: str) -> float:
    m = re.findall(r"([0-9.]+) tok/s", stderr)
    if not m:
        raise SystemExit(f"generate printed no decode rate: {stderr[-300:]}")
    return float(m[0])


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--busy", default="0,1", help="comma-separated counts of background 1-thread jobs")
    p.add_argument("--jobs", default="generate,export", help="generate, export or both")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write results.md and results.json here")
    a = p.parse_args()
    jobs = a.jobs.split(",")
    work = Path(tempfile.mkdtemp(prefix="griffin-threads-"))
    bundle = work / "expert.safetensors"
    griffin([str(PROMPT), "-o", str(bundle), "-q", "--threads", "1"], {})
    results: dict = {}
    for busy in [int(b) for b in a.busy.split(",")]:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for _ in range(busy)]
        try:
            time.sleep(2 if busy else 0)
            figures = {(s, j): [] for s in SETTINGS for j in jobs}
            for r in range(a.repeats):
                for name, (args, env) in SETTINGS.items():
                    if "generate" in jobs:
                        _, err = griffin(["generate", str(bundle), "--max-new-tokens", "64", *args], env)
                        figures[(name, "generate")].append(decode_rate(err))
                    if "export" in jobs:
                        seconds, _ = griffin([str(PROMPT), "-o", str(work / "x.safetensors"), "--force", "-q", *args],
                                             env)
                        figures[(name, "export")].append(seconds)
                print(f"busy {busy}: repeat {r + 1}/{a.repeats} done", file=sys.stderr, flush=True)
        finally:
            for q in procs:
                q.kill()
        results[busy] = {f"{s}|{j}": v for (s, j), v in figures.items()}
    head = (f"`python -m bench.threads --repeats {a.repeats} --busy {a.busy} --jobs {a.jobs}` on {os.cpu_count()} "
            "cores; medians (min-max) over the repeats; ratio: setting / default, paired by repeat")
    lines = [head, "",
             "| other jobs | setting | generate tok/s | ratio | export s | ratio |", "|---|---|---|---|---|---|"]
    for busy, figs in results.items():
        for s in SETTINGS:
            cells = []
            for j in ("generate", "export"):
                xs, ds = figs.get(f"{s}|{j}"), figs.get(f"{DEFAULT}|{j}")
                cells += [spread(xs), spread([x / d for x, d in zip(xs, ds)])] if xs else ["-", "-"]
            lines.append(f"| {busy} | {s} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if a.output:
        a.output.mkdir(parents=True, exist_ok=True)
        (a.output / "results.md").write_text(table + "\n")
        (a.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
