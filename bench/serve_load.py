"""Load on `griffin-export serve`: mixed traffic from N concurrent clients over loopback, the routed class
experts (model "auto") against the full model ("full") of the same server, in one run.

    python -m bench.serve_load --router classes/router.safetensors [--clients 1,4,16] [--repeats 3]
                               [--requests 64] [--seconds 120] [-o reports/serve_load/]
    python -m bench.serve_load --url http://127.0.0.1:8000 [--api-key KEY]    # a server already running

Without --url a server is started (`griffin-export serve --router ...`, in a process of its own, on a free
port) and stopped at the end. The prompts are bench/data/mixed_report.jsonl's rows in order (five kinds
shuffled), every request streamed (time to first token is the first piece of text), each run bounded in
count (--requests) and time (--seconds). Every answer is --max-tokens tokens long (ignore_eos, no stop
strings; --natural: each row's own stop strings and eos instead), so both models do the same work.

Per repeat, every client count runs "auto" then "full" (or "full" then "auto", alternating by repeat) on the
same prompts; the table shows each figure's median over the repeats with its range, and the ratios auto/full
(throughput, p99 total latency) per repeat, with their range. A warm-up request per model comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "mixed_report.jsonl"


@dataclass
class Done:
    ttft: float  # seconds to the first piece of text (the whole answer where it has none)
    total: float
    tokens: int
    group: str = ""  # the class that served it ("full" where the guard fired)
    error: str | None = None


@dataclass
class Run:
    model: str
    clients: int
    repeat: int
    wall: float = 0.0
    done: list[Done] = field(default_factory=list)

    def ok(self) -> list[Done]:
        return [d for d in self.done if d.error is None]

    def summary(self) -> dict:
        ok = self.ok()
        tokens = sum(d.tokens for d in ok)
        return {"model": self.model, "clients": self.clients, "repeat": self.repeat, "requests": len(ok),
                "errors": len(self.done) - len(ok), "tokens": tokens, "wall_s": round(self.wall, 3),
                "tok_s": tokens / self.wall if self.wall else 0.0, "req_s": len(ok) / self.wall if self.wall else 0.0,
                "ttft_p50": pct([d.ttft for d in ok], 50), "ttft_p99": pct([d.ttft for d in ok], 99),
                "total_p50": pct([d.total for d in ok], 50), "total_p99": pct([d.total for d in ok], 99),
                "groups": {g: sum(d.group == g for d in ok) for g in sorted({d.group for d in ok})}}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def one(http, url: str, headers: dict, model: str, row: dict, ns) -> Done:
    body = {"model": model, "prompt": row["prompt"], "max_tokens": ns.max_tokens or row.get("max_tokens", 64),
            "stream": True, "stream_options": {"include_usage": True}}
    if ns.natural:
        body["stop"] = row.get("stop") or None
    else:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    first, tokens, group = None, 0, ""
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return Done(0, time.perf_counter() - t0, 0, error=f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Done(0, time.perf_counter() - t0, 0, error=str(chunk["error"]))
                if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                    first = time.perf_counter() - t0
                if chunk.get("griffin"):
                    group = chunk["griffin"].get("class", "")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        return Done(0, time.perf_counter() - t0, 0, error=f"{type(e).__name__}: {e}")
    total = time.perf_counter() - t0
    return Done(first if first is not None else total, total, tokens, group)


async def run(url: str, headers: dict, model: str, clients: int, repeat: int, prompts: list[dict], ns) -> Run:
    import httpx

    out = Run(model, clients, repeat)
    queue = list(range(min(ns.requests, len(prompts))))
    deadline = time.perf_counter() + ns.seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def client() -> None:
            while queue and time.perf_counter() < deadline:
                out.done.append(await one(http, url, headers, model, prompts[queue.pop(0)], ns))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        out.wall = time.perf_counter() - t0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ns) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "griffin_export_cli.main", "serve", "--router", ns.router, "--port", str(port),
            "--backend", ns.backend, "--max-batch", str(ns.max_batch), "-q"]
    for flag, value in (("--model", ns.model), ("--threads", ns.threads)):
        if value:
            argv += [flag, str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # the server's log in a file: a pipe nobody reads would block it once full
    log = Path(ns.output or tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800  # a backend that exports its files first takes a while
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({log}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 30 minutes")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median [min, max] over the repeats."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def report(summaries: list[dict], levels: list[int], models: list[str]) -> str:
    def of(model, clients, key):
        return [s[key] for s in summaries if s["model"] == model and s["clients"] == clients]

    lines = ["| clients | model | tokens/s | requests/s | TTFT p50 (s) | TTFT p99 (s) | total p50 (s) | "
             "total p99 (s) | answers | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for m in models:
            lines.append(f"| {c} | {m} | {spread(of(m, c, 'tok_s'))} | {spread(of(m, c, 'req_s'), '{:.2f}')} | "
                         f"{spread(of(m, c, 'ttft_p50'), '{:.2f}')} | {spread(of(m, c, 'ttft_p99'), '{:.2f}')} | "
                         f"{spread(of(m, c, 'total_p50'), '{:.2f}')} | {spread(of(m, c, 'total_p99'), '{:.2f}')} | "
                         f"{sum(of(m, c, 'requests'))} | {sum(of(m, c, 'errors'))} |")
    if set(models) == {"auto", "full"}:
        lines += ["", "| clients | auto / full tokens/s | auto / full p99 total latency | auto / full p99 TTFT |",
                  "|---|---|---|---|"]
        for c in levels:
            a, f = of("auto", c, "tok_s"), of("full", c, "tok_s")
            la, lf = of("auto", c, "total_p99"), of("full", c, "total_p99")
            ta, tf = of("auto", c, "ttft_p99"), of("full", c, "ttft_p99")
            lines.append(f"| {c} | {spread([x / y for x, y in zip(a, f)], '{:.2f}')}× | "
                         f"{spread([x / y for x, y in zip(la, lf)], '{:.2f}')}× | "
                         f"{spread([x / y for x, y in zip(ta, tf)], '{:.2f}')}× |")
    for m in models:
        if len(levels) > 1:
            hi, lo = of(m, max(levels), "tok_s"), of(m, min(levels), "tok_s")
            lines.append(f"\n{m}: {max(levels)} clients / {min(levels)} client tokens/s: "
                         f"{spread([x / y for x, y in zip(hi, lo)], '{:.2f}')}×")
    groups: dict[str, int] = {}
    for s in summaries:
        if s["model"] == "auto":
            for g, n in s["groups"].items():
                groups[g] = groups.get(g, 0) + n
    if groups:
        lines.append("\nauto's answers by the class that served them: "
                     + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--router", help="start a server over this router (and its class bundles)")
    where.add_argument("--url", help="a server already running")
    ap.add_argument("--api-key", default=os.environ.get("GRIFFIN_EXPORT_API_KEY"))
    ap.add_argument("--model", default=None, help="--router: the base model [default: the router's]")
    ap.add_argument("--backend", default="torch", help="--router: the serve backend")
    ap.add_argument("--max-batch", type=int, default=16, help="--router: serve --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="--router: serve --threads")
    ap.add_argument("--models", default="auto,full", help="the models compared")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64, help="requests per run at most")
    ap.add_argument("--seconds", type=float, default=120.0, help="seconds per run at most (requests in flight finish)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per answer [default: each row's, 64]")
    ap.add_argument("--natural", action="store_true", help="each row's stop strings and eos end its answer")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("-o", "--output", default=None, help="a folder for results.json and results.md")
    ns = ap.parse_args()
    levels = [int(c) for c in ns.clients.split(",")]
    models = ns.models.split(",")
    prompts = rows(Path(ns.data))
    proc = None
    if ns.router:
        proc, url = start_server(ns)
    else:
        url = ns.url.rstrip("/")
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    t0 = time.perf_counter()
    summaries = []
    try:
        for m in models:  # warm-up: the first request of each model pays for what is built lazily
            asyncio.run(run(url, headers, m, 1, -1, prompts, argparse.Namespace(**{**vars(ns), "requests": 1})))
        for repeat in range(ns.repeats):
            for c in levels:
                for m in (models if repeat % 2 == 0 else models[::-1]):
                    result = asyncio.run(run(url, headers, m, c, repeat, prompts, ns))
                    summaries.append(result.summary())
                    errors = [d.error for d in result.done if d.error]
                    print(f"repeat {repeat} clients {c:>2} {m:>5}: {summaries[-1]['tok_s']:.1f} tok/s, "
                          f"{summaries[-1]['requests']} answers" + (f", {len(errors)} errors: {errors[0]}" if errors
                                                                     else ""), file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    finish("Serving under load", "serve_load", report(summaries, levels, models), t0, ns.output,
           {"runs": summaries, "settings": vars(ns)})


def finish(title: str, script: str, text: str, t0: float, output: str | None, data: dict) -> None:
    """Print the table; with an output folder, also results.md (the table under its command) and results.json."""
    command = f"python -m bench.{script} " + " ".join(sys.argv[1:])
    print(text)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"command": command, **data}, indent=1))
        (out / "results.md").write_text(f"# {title}\n\n`{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
