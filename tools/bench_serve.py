#!/usr/bin/env python
"""Throughput and latency of `hidream-export serve` under concurrent clients, against plain Pipeline calls.

    python tools/bench_serve.py [--engines DIR] [--variant fast] [--clients 1 8] [--seconds 30] [--rounds 3]
                                [--steps N] [--size 256] [--max-queue-delay-ms 10] [--threads N] [--instances N]
                                [--no-unbatched] [--workdir DIR] [--json OUT]

In one run, on one engine folder (built from the tiny random checkpoint unless --engines is given):

- baseline: the folder through plain `Pipeline` calls in this process, one after another;
- the same folder through `Pipeline.generate_batch` in this process, as many images per call as the
  server's batches hold: what batching gains without a server around it;
- a server (`hidream-export serve` on 127.0.0.1, batching on), with each --clients count: that many
  client threads, each sending one request after another (own seeds, same size) until the phase's time
  is up; the requests still running then finish;
- a second server with `--batching off`, at the largest client count (unless --no-unbatched): what the
  server gains from batching rather than from overlapping requests.

The phases alternate in --rounds rounds of --seconds/--rounds each, so a change in a shared machine's
load hits every phase alike. Per phase: images, images/s, the ratios to the baseline and to one
client, CPU seconds per image (of this process for the baseline, of tritonserver and its stub processes
for a server: on a machine shared with other work this is the steadier measure of what batching saves),
p50/p95 latency as the clients saw it, images per transformer batch and requests per Triton
execution (from the server's metrics), and the server's seconds per stage (its Prometheus histograms),
which shows where the time went. Printed as markdown; --json writes everything. Every loop stops at
its deadline and every request has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hidream_export.runtime.report import markdown_table, write_json  # noqa: E402  (torch-free)
from hidream_export.runtime.pipeline import GenerationRequest  # noqa: E402
from hidream_export.serve.client import connect, request_image  # noqa: E402
from hidream_export.testing.serving import local_server, metric_values  # noqa: E402

PROMPT = "a cat holding a sign that says hello, number {k}"
REQUEST_S = 300.0


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores ({platform.system()} {platform.release()})"


def build_tiny(variant: str, work: Path) -> Path:
    from hidream_export.build.pipeline import build_pipeline
    from hidream_export.testing.model_folder import write_model_folder

    model = write_model_folder(work / f"tiny-{variant}", variant, "tiny", seed=0)
    build_pipeline(model, variant, work / "engines" / variant)
    return work / "engines" / variant


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Phase:
    """One configuration's measurements, summed over its rounds."""

    label: str
    clients: int
    images: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time the generating processes used (server: tritonserver and its stubs)
    latencies: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # server metric deltas

    def add_counters(self, delta: dict) -> None:
        for key, value in delta.items():
            if isinstance(value, dict):
                into = self.counters.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0.0) + v
            else:
                self.counters[key] = self.counters.get(key, 0.0) + value

    def ratio(self, num: str, den: str) -> float:
        d = self.counters.get(den, 0.0)
        return self.counters.get(num, 0.0) / d if d else float("nan")


def run_in_process(pipe, phase: Phase, args, seconds: float, first_seed: int, batch: int = 1) -> None:
    """Plain Pipeline calls in this process, one after another, for `seconds`: one image per call, or
    `batch` images per `generate_batch` call (what the server does without the server around it)."""
    start, cpu = time.perf_counter(), time.process_time()
    k = 0
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        requests = [GenerationRequest(PROMPT.format(k=first_seed + k + b), seed=first_seed + k + b, width=args.size,
                                      height=args.size, steps=args.steps) for b in range(batch)]
        if batch == 1:
            r = requests[0]
            pipe(r.prompt, seed=r.seed, width=r.width, height=r.height, steps=r.steps)
        else:
            pipe.generate_batch(requests)
        phase.latencies.extend([time.perf_counter() - t] * batch)
        k += batch
    phase.seconds += time.perf_counter() - start
    phase.cpu_seconds += time.process_time() - cpu
    phase.images += k


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and every process below it (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, grew = {pid}, True
    while grew:
        below = {p for p, parent in parents.items() if parent in tree} - tree
        grew = bool(below)
        tree |= below
    return sum(times.get(p, 0.0) for p in tree)


def server_counters(server, model: str) -> dict:
    def one(name: str, labels: str) -> float:
        return metric_values(server.metrics, name).get(labels, 0.0)

    version = f'{{model="{model}",version="1"}}'
    return {"exec": one("nv_inference_exec_count", version), "requests": one("nv_inference_count", version),
            "run_images": one("hidream_run_images_sum", f'{{model="{model}"}}'),
            "runs": one("hidream_run_images_count", f'{{model="{model}"}}'),
            "stages": {k.split('stage="')[1].rstrip('"}'): v for k, v in
                       metric_values(server.metrics, "hidream_stage_seconds_sum").items() if f'model="{model}"' in k}}


def run_clients(server, model: str, phase: Phase, args, seconds: float, first_seed: int) -> None:
    """`phase.clients` threads sending requests one after another until the deadline."""
    before = server_counters(server, model)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    done = [0]

    def client_loop(c: int) -> None:
        with connect(server.http, REQUEST_S) as client:
            k = 0
            while time.perf_counter() < deadline:
                seed = first_seed + 1000 * c + k
                try:
                    r = request_image(client, GenerationRequest(PROMPT.format(k=seed), seed=seed, width=args.size,
                                                           height=args.size, steps=args.steps), model, REQUEST_S)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    with lock:
                        phase.errors.append(str(exc))
                    return
                with lock:
                    phase.latencies.append(r.seconds)
                    done[0] += 1
                k += 1

    start, cpu = time.perf_counter(), tree_cpu_seconds(server.process.pid)
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(phase.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + REQUEST_S)
    phase.seconds += time.perf_counter() - start
    phase.cpu_seconds += tree_cpu_seconds(server.process.pid) - cpu
    phase.images += done[0]
    after = server_counters(server, model)
    delta = {k: after[k] - before[k] for k in after if k != "stages"}
    delta["stages"] = {s: v - before["stages"].get(s, 0.0) for s, v in after["stages"].items()}
    phase.add_counters(delta)


def warm_up(server, model: str, args) -> None:
    with connect(server.http, REQUEST_S) as client:
        request_image(client, GenerationRequest(PROMPT.format(k=-1), seed=0, width=args.size, height=args.size,
                                           steps=args.steps), model, REQUEST_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, default=None, help="engine folder (default: build the tiny one)")
    parser.add_argument("--variant", default="fast", help="variant of the tiny build (default fast)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase, over all rounds (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds the phases alternate in (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per image (default: the recipe)")
    parser.add_argument("--size", type=int, default=256, help="square image side in px (default 256)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own)")
    parser.add_argument("--instances", type=int, default=1, help="server model instances (default 1)")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --batching off phase")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    folder = args.engines or build_tiny(args.variant, work)
    from hidream_export.manifest import Manifest

    model = Manifest.read(folder).variant.name
    server_args = ["--max-queue-delay-ms", str(args.max_queue_delay_ms), "--exit-timeout", "30"]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    if args.instances != 1:
        server_args += ["--instances", str(args.instances)]

    from hidream_export.runtime import Pipeline

    pipe = Pipeline.from_dir(folder, threads=args.threads, progress=False)
    pipe(PROMPT.format(k=-1), seed=0, width=args.size, height=args.size, steps=args.steps)  # warm-up
    phases = [Phase("Pipeline, sequential", 1)]
    batch = pipe.transformer_info.batch_range[1] // pipe.variant.cfg_batch_factor
    in_process_batch = Phase(f"Pipeline.generate_batch, {batch} per call", 1)
    with contextlib.ExitStack() as stack:
        on = stack.enter_context(local_server([folder], server_args, log=work / "serve.log"))
        servers = [(on, [Phase("server, batching on", c) for c in args.clients])]
        if not args.no_unbatched:
            off = stack.enter_context(local_server([folder], [*server_args, "--batching", "off"],
                                                   log=work / "serve-off.log"))
            servers.append((off, [Phase("server, batching off", max(args.clients))]))
        for server, _ in servers:
            warm_up(server, model, args)
        # Rounds alternate the phases, so a change in the machine's load (it is shared) hits all alike.
        share = args.seconds / args.rounds
        for r in range(args.rounds):
            run_in_process(pipe, phases[0], args, share, 10**6 * r)
            run_in_process(pipe, in_process_batch, args, share, 10**6 * r, batch)
            for server, server_phases in servers:
                for phase in server_phases:
                    run_clients(server, model, phase, args, share, 10**6 * r)
        phases += [in_process_batch] + [p for _, server_phases in servers for p in server_phases]

    base = phases[0].images / phases[0].seconds
    base_cpu = phases[0].cpu_seconds / max(1, phases[0].images)
    single = next((p for p in phases if p.label == "server, batching on" and p.clients == 1), None)
    rows = []
    for p in phases:
        rate = p.images / p.seconds
        vs_single = f"{rate / (single.images / single.seconds):.2f}x" if single and p.counters else ""
        cpu = p.cpu_seconds / max(1, p.images)
        rows.append([p.label, p.clients, p.images, f"{rate:.2f}", f"{rate / base:.2f}x", vs_single, f"{cpu:.3f}",
                     f"{base_cpu / cpu:.2f}x" if cpu else "",
                     f"{percentile(p.latencies, 0.5):.3f}", f"{percentile(p.latencies, 0.95):.3f}",
                     f"{p.ratio('run_images', 'runs'):.2f}" if p.counters else "1.00",
                     f"{p.ratio('requests', 'exec'):.2f}" if p.counters else "1.00", len(p.errors)])
    print(f"## bench_serve: {folder} ({model}), {args.size}x{args.size}, steps {args.steps or 'recipe'}, "
          f"{args.seconds:g} s per phase in {args.rounds} rounds, threads {args.threads or 'default'}, "
          f"instances {args.instances}\n\nmachine: {machine()}\n")
    print(markdown_table(["phase", "clients", "images", "images/s", "vs Pipeline", "vs 1 client", "CPU s/image",
                          "images per CPU s vs Pipeline", "p50 s", "p95 s",
                          "images/batch", "requests/execution", "errors"], rows))
    stage_rows = []
    for p in phases:
        stages = p.counters.get("stages", {})
        total = sum(v for s, v in stages.items() if s not in ("total", "step"))
        for stage in ("parse", "tokenize", "encode_clip_l", "encode_clip_g", "encode_t5", "encode_llama",
                      "transformer", "scheduler", "vae", "postprocess", "respond"):
            v = stages.get(stage, 0.0)
            if v:
                stage_rows.append([f"{p.label}, {p.clients} clients", stage, f"{v:.2f}",
                                   f"{1e3 * v / max(1, p.images):.1f}", f"{100 * v / total:.0f}%"])
    print("\nserver time per stage (from its metrics):\n")
    print(markdown_table(["phase", "stage", "seconds", "ms per image", "share"], stage_rows))
    for p in phases:
        if p.errors:
            print(f"\n{p.label} ({p.clients} clients) errors: {p.errors[:3]}")
    if args.json:
        write_json(args.json, {"machine": machine(), "folder": str(folder),
                               "args": {k: str(v) for k, v in vars(args).items()},
                               "phases": [{"label": p.label, "clients": p.clients, "images": p.images,
                                           "seconds": p.seconds, "cpu_seconds": p.cpu_seconds,
                                           "latency_p50": percentile(p.latencies, 0.5),
                                           "latency_p95": percentile(p.latencies, 0.95), "errors": p.errors,
                                           "counters": p.counters} for p in phases]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
