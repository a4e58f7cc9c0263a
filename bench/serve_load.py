"""Serving load: N concurrent streaming clients x M requests against `vlmkit serve` on loopback, with
continuous batching (`--max-batch`, default 32) and, in the same run, one request at a time (`--max-batch 1`).

Each client sends its requests one after another (an image from `--images` and a question, greedy,
`stream: true` with usage). Reported per server: p50 / p95 time to first token (first non-empty content
chunk) and latency (to `[DONE]`), aggregate generated tokens per second (all completion tokens / the
phase's wall time), the server's peak resident memory (VmHWM) and how many requests failed.

    python bench/serve_load.py runs/demo/instruct [--clients 32] [--requests 4] [--images runs/demo/data/images]

The server and the clients share the machine; the two servers run the same requests one after the other,
so their ratio is the comparison to read (`--rounds 2` measures both twice, in alternating order).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTIONS = ["Describe the image.", "List the objects and their boxes.", "How many objects are there?",
             "What is in this image?", "Write a short caption for the image.", "Which objects are where?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, max_batch: int, max_queue: int, precision: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--precision", precision],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else time.perf_counter() - started,
            "latency": time.perf_counter() - started, "tokens": tokens}


async def load(base: str, bodies: list[list[dict]]) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def run_client(mine: list[dict]) -> list[dict]:
            return [await one_request(client, body) for body in mine]

        started = time.perf_counter()
        results = await asyncio.gather(*(run_client(mine) for mine in bodies))
        return [r for rs in results for r in rs], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[dict], wall: float, peak: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft, latency = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
            "peak_rss_mib": peak, "errors": sorted({r["error"] for r in results if "error" in r})[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--images", default=None, help="a folder of PNGs (default: DATA/images next to a demo run)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=1, help="measure both servers this many times, order alternating")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    images_dir = Path(args.images) if args.images else Path(args.model_dir).resolve().parent / "data" / "images"
    pngs = sorted(images_dir.glob("*.png"))[: args.clients * args.requests]
    if not pngs:
        sys.exit(f"no PNG images in {images_dir}: give --images DIR")
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in pngs]
    bodies = [[{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": urls[(c * args.requests + i) % len(urls)]}},
        {"type": "text", "text": QUESTIONS[(c + i) % len(QUESTIONS)]}]}],
        "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        for i in range(args.requests)] for c in range(args.clients)]

    servers = [("continuous batching", args.max_batch), ("sequential", 1)]
    rounds = []
    for r in range(args.rounds):  # alternate the order (AB, BA, ...) so drifting load hits both alike
        rows = {}
        for name, max_batch in servers if r % 2 == 0 else servers[::-1]:
            proc, base = start_server(args.model_dir, max_batch, args.clients * args.requests, args.precision)
            try:
                asyncio.run(load(base, [bodies[0][:1]]))  # warm-up: first-call costs out of the measurement
                results, wall = asyncio.run(load(base, bodies))
                rows[name] = {"max_batch": max_batch, **summarize(results, wall, peak_rss_mib(proc.pid))}
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"round {r + 1}, {name}: {json.dumps(rows[name])}", flush=True)
        rounds.append({name: rows[name] for name, _ in servers})

    print(f"\n{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, {args.precision}, "
          f"{os.cpu_count()} CPUs\n")
    print("| round | server | requests (failed) | tokens/s | TTFT p50 / p95 | latency p50 / p95 | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ratios = []
    for r, rows in enumerate(rounds):
        for name, row in rows.items():
            print(f"| {r + 1} | {name} (`--max-batch {row['max_batch']}`) | {row['requests']} ({row['failed']}) "
                  f"| {row['tokens_per_s']:.0f} | {row['ttft_p50_s']:.2f} / {row['ttft_p95_s']:.2f} s "
                  f"| {row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} s | {row['peak_rss_mib']:.0f} MiB |")
        ratios.append(rows["continuous batching"]["tokens_per_s"] / rows["sequential"]["tokens_per_s"])
    print(f"\naggregate tokens/s, continuous batching / sequential, per round: "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
