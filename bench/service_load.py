"""Load check of the service: concurrent clients polling ``GET /v1/scans/{id}`` while a scan runs or an upload streams.

Starts a real ``backdoor-scan serve`` (uvicorn + one worker process) on a free loopback port with a fresh data
directory, then runs three phases, each with ``--clients`` concurrent clients (asyncio + one keep-alive
``httpx.AsyncClient`` each) polling ``GET /v1/scans/{id}`` back to back, as fast as the server answers:

- ``A idle``: a finished scan is polled, nothing else runs (the baseline), for ``--seconds``;
- ``B scan``: a Neural Cleanse scan of a BadNets MNIST model (.pt2 + clean samples) is submitted and the pollers
  poll that very scan from its submission until it succeeds (the phase lasts as long as the scan);
- ``C upload``: another client, in its own process, streams ``--upload-mb`` MiB of random bytes as the ``model``
  part of ``POST /v1/scans`` over and over (the server stores and hashes it, then refuses it as no model format);
  an upload still in flight when the phase ends is cut off.

In every phase a probe process asks for ``/livez`` every 50 ms, and right after it for an unknown path
(``/__loop_probe__``, a 404). ``/livez`` is a sync route (FastAPI runs it in the thread pool, like the scan
routes); the 404 is answered on the event loop alone, so its latency is the event-loop probe proper: a blocked
loop delays both, a saturated thread pool only ``/livez``. The probes and the uploader run in their own processes
so that the pollers' event loop does not delay them.

Inside the server, a loop monitor (a ``sitecustomize.py`` put on the server's ``PYTHONPATH``; no service code is
changed) logs every event-loop callback that held the loop longer than ``--slow-callback-ms`` (default 100), with
its wall and CPU time, and every full (generation-2) garbage collection with its pause. The table counts them per
phase; a slow callback during which a full collection ran is reported as such (the collector holds the GIL, so a
collection in any thread of the API process stops the loop). ``--gc-freeze`` is an experiment: once the server is
up, its API process collects and ``gc.freeze()``-es its objects (torch's among them), as a fix in the service would.

The worker runs with ``BDS_TORCH_THREADS=1``: on the 2-core project box that leaves one core to the API (and the
load generator, which shares it: the latencies include the client's own queueing). Percentiles are over all
samples of a phase; ``errors`` counts non-200 answers and transport errors of the pollers. The CPU line of each
phase says how many cores the API, the worker and the load generator got: on a shared box, less than asked.

    .venv/bin/python bench/service_load.py [--clients 50] [--seconds 10] [--upload-mb 200] [--port 0]
        [--slow-callback-ms 100] [--gc-freeze] [--server-log FILE]

The model and the samples are made once and kept in ``.bench-cache/service-load/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ holds the server helpers that the service tests use too
from tests.servers import FINAL, free_port  # noqa: E402

CACHE = ROOT / ".bench-cache" / "service-load"
API_KEY = "bench-key-0123456789abcdef"
PROBE_INTERVAL_S = 0.05
LOOP_PROBE_PATH = "/__loop_probe__"


# ----------------------------------------------------------------------------------------------- files


def prepare(samples: int) -> tuple[Path, Path]:
    """A BadNets ``mnist_cnn`` exported as .pt2 (dynamic batch) and ``samples`` clean MNIST test images as .npz."""
    model_path, data_path = CACHE / "badnets.pt2", CACHE / f"clean-{samples}.npz"
    if model_path.exists() and data_path.exists():
        return model_path, data_path
    # torch only here: the spawned probe and upload processes re-import this module and must stay light
    import torch

    from scanner.testing.attacks import BadNetsRecipe
    from scanner.testing.mnist import load_mnist_split
    from scanner.testing.training import accuracy, train_mnist_cnn
    from scanner.trigger import attack_success_rate

    CACHE.mkdir(parents=True, exist_ok=True)
    split = load_mnist_split(test_fraction=0.2, seed=0)
    if not model_path.exists():
        recipe = BadNetsRecipe()
        trigger, poisoned = recipe.poison(split.train_images, split.train_labels)
        cpu = torch.device("cpu")
        model = train_mnist_cnn(poisoned.images, poisoned.labels, device=cpu).eval()
        acc = accuracy(model, split.test_images, split.test_labels, device=cpu)
        asr = attack_success_rate(model, split.test_images, split.test_labels, trigger, recipe.target, device=cpu)
        print(f"trained BadNets mnist_cnn (target {recipe.target}): clean accuracy {acc:.3f}, ASR {asr:.3f}")
        program = torch.export.export(model, (split.test_images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        partial = model_path.with_suffix(".partial")
        torch.export.save(program, partial)
        os.replace(partial, model_path)
    if not data_path.exists():
        x = split.test_images[:samples].mul(255).round().to(torch.uint8).numpy()
        y = split.test_labels[:samples].numpy()
        partial = data_path.with_suffix(".partial")
        with partial.open("wb") as fh:
            np.savez(fh, x=x, y=y)
        os.replace(partial, data_path)
    return model_path, data_path


# ----------------------------------------------------------------------------------------------- server

# Put on the server's PYTHONPATH as sitecustomize.py: times every event-loop callback (asyncio.Handle._run, which
# also runs every task step) and writes one JSON line to stderr for each that held the loop thread longer than the
# limit, with its wall and thread CPU time (wall >> CPU: the thread waited for a core or the GIL; wall ~ CPU: the
# callback itself computed that long). asyncio's own debug mode cannot be used: uvicorn runs its loop with debug off.
# It also logs every full (generation 2) garbage collection with its pause: the GIL is held throughout, so a
# collection in any thread stops the event loop. With --gc-freeze, SIGUSR1 makes the process collect, then
# gc.freeze() what is left (the experiment of a service that freezes its start-up objects once it is up).
LOOP_MONITOR = """
import asyncio, asyncio.events, gc, json, os, sys, threading, time

_limit = float(os.environ.get("BENCH_SLOW_CALLBACK_MS", "100")) / 1000
_run = asyncio.events.Handle._run
_gc_started = [0.0]


def _emit(**fields):
    sys.stderr.write(json.dumps({**fields, "pid": os.getpid(), "at": time.time()}) + "\\n")


def _gc_pause(phase, info):
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _gc_started[0]
    if info["generation"] == 2 or pause > _limit:
        thread = threading.current_thread().name
        _emit(gc_pause_ms=1000 * pause, generation=info["generation"], collected=info["collected"], thread=thread)


gc.callbacks.append(_gc_pause)

if os.environ.get("BENCH_GC_FREEZE_ON_SIGUSR1"):
    import signal

    def _freeze(signum, frame):
        gc.collect()
        gc.freeze()
        _emit(gc_frozen=gc.get_freeze_count())

    signal.signal(signal.SIGUSR1, _freeze)


def _describe(handle):
    task = getattr(handle._callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        return repr(handle)[:300]
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    where = f", now at {frame.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno}" if frame else ""
    return f"step of task {getattr(coro, '__qualname__', coro)}{where}"


def _timed_run(self):
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        _run(self)
    finally:
        wall = time.perf_counter() - wall
        if wall > _limit:
            cpu = time.thread_time() - cpu
            _emit(slow_callback=_describe(self), wall_ms=1000 * wall, cpu_ms=1000 * cpu)


asyncio.events.Handle._run = _timed_run
"""


@dataclass
class Server:
    """``python -m service.cli serve`` with one worker, in its own data directory."""

    workdir: Path
    port: int
    slow_callback_ms: float = 100  # 0: no loop monitor
    gc_freeze: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    def start(self, timeout: float = 180) -> None:
        env = {
            **os.environ,
            "BDS_DATA_DIR": str(self.workdir / "data"),
            "BDS_API_KEYS": API_KEY,
            "BDS_DEVICE": "cpu",
            "BDS_TORCH_THREADS": "1",  # the scan keeps to one core; the other is the API's (and the load's)
            "BDS_WORKER_THREADS": "1",
        }
        if self.slow_callback_ms > 0:
            monitor = self.workdir / "loop-monitor"
            monitor.mkdir(exist_ok=True)
            (monitor / "sitecustomize.py").write_text(LOOP_MONITOR)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(monitor), os.environ.get("PYTHONPATH")]))
            env["BENCH_SLOW_CALLBACK_MS"] = str(self.slow_callback_ms)
            if self.gc_freeze:
                env["BENCH_GC_FREEZE_ON_SIGUSR1"] = "1"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--workers", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,  # no stray .env from the repository
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def freeze_gc(self) -> None:
        """Experiment (``--gc-freeze``): have the API process collect and ``gc.freeze()`` its objects now."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not any("gc_frozen" in line for line in self.log().splitlines()[-50:]):
            if time.monotonic() > deadline:
                raise TimeoutError("the API process did not report gc.freeze()")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM (uvicorn drains, then the CLI stops its worker); SIGKILL after 60 s. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def monitor_events(self, pid: int) -> list[dict[str, Any]]:
        """What the loop monitor of process ``pid`` logged: slow callbacks and full collections, one dict each."""
        found = []
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(('{"slow_callback"', '{"gc_pause_ms"')):
                    with suppress(json.JSONDecodeError):
                        event = json.loads(line)
                        if event.get("pid") == pid:
                            found.append(event)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


# ----------------------------------------------------------------------------------------------- side processes


def _probe(url: str, ready: Event, stop: Event, out: Queue[Any]) -> None:
    """Every 50 ms: ``GET /livez``, then ``GET /__loop_probe__`` (a 404 served by the event loop alone)."""
    livez: list[tuple[float, float]] = []  # (seconds since start, latency s)
    loop: list[tuple[float, float]] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        client.get("/livez")  # open the keep-alive connection before the phase starts
        ready.set()
        started = next_at = time.perf_counter()
        while not stop.is_set():
            for path, samples, expected in (("/livez", livez, 200), (LOOP_PROBE_PATH, loop, 404)):
                sent = time.perf_counter()
                try:
                    status = client.get(path).status_code
                except httpx.HTTPError:
                    status = 0
                samples.append((sent - started, time.perf_counter() - sent))
                errors += status != expected
            next_at = max(next_at + PROBE_INTERVAL_S, time.perf_counter())
            time.sleep(max(0.0, next_at - time.perf_counter()))
    out.put({"livez": livez, "loop": loop, "errors": errors})


class _Stopped(Exception):
    pass


def _upload(url: str, megabytes: int, ready: Event, stop: Event, out: Queue[Any]) -> None:
    """POST ``megabytes`` MiB of random bytes as the ``model`` part, again and again until ``stop``."""
    block = os.urandom(1 << 20)  # one random MiB, sent ``megabytes`` times: random to every sniffer, no disk
    boundary = f"bench-{secrets.token_hex(12)}"
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="model"; filename="random-{megabytes}mb.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + megabytes * len(block) + len(tail)),
    }

    sent_bytes = 0

    def body() -> Iterator[bytes]:
        nonlocal sent_bytes
        yield head
        for _ in range(megabytes):
            if stop.is_set():
                raise _Stopped
            yield block
            sent_bytes += len(block)  # counted once the transport asks for the next piece
        yield tail

    done: list[dict[str, Any]] = []
    cut = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as client:
        ready.set()
        started = time.perf_counter()
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                response = client.post("/v1/scans", content=body(), headers=headers)
            except Exception:  # cut off at the end of the phase (or a transport error)
                if stop.is_set():
                    cut += 1
                    break
                done.append({"status": 0, "code": "transport_error", "seconds": time.perf_counter() - sent})
                continue
            code = ""
            if response.status_code >= 400:
                with suppress(ValueError, AttributeError):
                    code = str(response.json().get("code", ""))
            done.append({"status": response.status_code, "code": code, "seconds": time.perf_counter() - sent})
    out.put({"uploads": done, "cut": cut, "mib": sent_bytes / 2**20, "seconds": time.perf_counter() - started})


@dataclass
class SideProcess:
    """A spawned probe or uploader: started and warmed up before the phase, stopped after it."""

    process: multiprocessing.process.BaseProcess
    ready: Event
    stop: Event
    out: Queue[Any]

    @classmethod
    def start(cls, ctx: SpawnContext, target: Callable[..., None], *args: object) -> SideProcess:
        ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        process = ctx.Process(target=target, args=(*args, ready, stop, out), daemon=True)
        process.start()
        if not ready.wait(120):
            process.terminate()
            raise TimeoutError(f"{target.__name__} process did not start")
        return cls(process, ready, stop, out)

    async def finish(self, timeout: float = 300) -> dict[str, Any]:
        self.stop.set()
        try:
            result: dict[str, Any] = await asyncio.to_thread(self.out.get, True, timeout)
        except queue.Empty:
            raise TimeoutError("a side process did not report") from None
        finally:
            await asyncio.to_thread(self.process.join, 10)
            if self.process.is_alive():
                self.process.terminate()
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()


# ----------------------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)  # time.time() at start and end
    slow: list[dict[str, Any]] = field(default_factory=list)  # loop callbacks over the limit
    full_gcs: list[dict[str, Any]] = field(default_factory=list)  # generation-2 collections in the API process
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    probe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def client(url: str) -> httpx.AsyncClient:
    # verify=False: plain HTTP on loopback; skips loading the CA bundle (~20 ms of CPU per client)
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, verify=False)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The live children of a process (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


async def poller(http: httpx.AsyncClient, target: asyncio.Future[str], stop: asyncio.Event, phase: Phase) -> None:
    scan_id = await target
    while not stop.is_set():
        sent = time.perf_counter()
        try:
            status = (await http.get(f"/v1/scans/{scan_id}")).status_code
        except httpx.HTTPError:
            phase.errors += 1
            continue
        phase.latencies.append(time.perf_counter() - sent)
        phase.errors += status != 200


async def run_phase(
    phase: Phase,
    url: str,
    target: asyncio.Future[str],
    clients: int,
    ctx: SpawnContext,
    during: Callable[[], Awaitable[None]],
    pids: dict[str, int],
    upload_mb: int = 0,
) -> Phase:
    """Pollers of the scan ``target`` resolves to, the probe (and the uploader) run while ``during()`` runs."""
    side = [SideProcess.start(ctx, _probe, url)]
    try:
        if upload_mb:
            side.append(SideProcess.start(ctx, _upload, url, upload_mb))
        https = [client(url) for _ in range(clients)]
        await asyncio.gather(*(http.get("/livez") for http in https))  # connect before the clock starts
        stop = asyncio.Event()
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started, wall_start = time.perf_counter(), time.time()
        tasks = [asyncio.create_task(poller(http, target, stop, phase)) for http in https]
        try:
            await during()
        finally:
            stop.set()
            phase.seconds = time.perf_counter() - started
            phase.window = (wall_start, time.time())
            await asyncio.gather(*tasks, return_exceptions=True)
            cpu = {name: (cpu_seconds(pid) - cpu[name]) / phase.seconds for name, pid in pids.items()}
            await asyncio.gather(*(http.aclose() for http in https))
        results = [await process.finish() for process in side]
        phase.notes.append("CPU, cores: " + ", ".join(f"{name} {used:.2f}" for name, used in cpu.items()))
    finally:
        for process in side:
            process.kill()
    phase.probe = results[0]
    if upload_mb:
        upload = results[1]
        outcomes = sorted({f"{u['status']} {u['code']}".strip() for u in upload["uploads"]})
        phase.notes.append(
            f"uploads of {upload_mb} MiB: {len(upload['uploads'])} answered ({', '.join(outcomes) or '-'}),"
            f" {upload['cut']} cut off at the end; {upload['mib']:.0f} MiB sent in {upload['seconds']:.1f} s"
            f" ({upload['mib'] / upload['seconds']:.0f} MiB/s)"
        )
    return phase


async def submit(url: str, files: dict[str, Path], **fields: str) -> str:
    async with client(url) as http:
        response = await http.post(
            "/v1/scans", files={name: (path.name, path.read_bytes()) for name, path in files.items()}, data=fields
        )
    response.raise_for_status()
    scan_id: str = response.json()["id"]
    return scan_id


async def wait_for(url: str, scan_id: str, timeout: float = 1800) -> dict[str, Any]:
    """Poll every 0.5 s until the scan is final (a fresh connection each time: uvicorn drops idle ones after 5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with client(url) as http:
            scan: dict[str, Any] = (await http.get(f"/v1/scans/{scan_id}")).json()
        if scan["status"] in FINAL:
            return scan
        await asyncio.sleep(0.5)
    raise TimeoutError(f"scan {scan_id} not finished after {timeout} s")


async def bench(args: argparse.Namespace, url: str, model: Path, data: Path, pids: dict[str, int]) -> list[Phase]:
    ctx = multiprocessing.get_context("spawn")
    phases: list[Phase] = []
    # a finished scan to poll in phase A (model only: no detector data, so it ends at once)
    first = await wait_for(url, await submit(url, {"model": model}))
    print(f"baseline scan {first['id']}: {first['status']} ({first['verdict']})", flush=True)

    async def idle() -> None:
        await asyncio.sleep(args.seconds)

    polled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    polled.set_result(first["id"])
    phases.append(await run_phase(Phase("A idle"), url, polled, args.clients, ctx, idle, pids))
    print("phase A done", flush=True)

    # phase B: submitted once the probe runs; the pollers poll this scan from the moment its id is known
    running: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    finished: dict[str, Any] = {}

    async def scan_runs() -> None:
        running.set_result(await submit(url, {"model": model, "data": data}))
        finished.update(await wait_for(url, running.result()))

    phase_b = await run_phase(Phase("B scan"), url, running, args.clients, ctx, scan_runs, pids)
    scan_id = running.result()
    nc = (finished.get("result") or {}).get("detectors", {}).get("neural_cleanse", {})
    phase_b.notes.append(
        f"scan {scan_id}: {finished['status']}, verdict {finished.get('verdict')}, flagged"
        f" {nc.get('flagged_classes', '?')}; submitted to final in {phase_b.seconds:.1f} s"
        f" (started {finished.get('started_at')}, finished {finished.get('finished_at')})"
    )
    phases.append(phase_b)
    print("phase B done", flush=True)

    phases.append(
        await run_phase(Phase("C upload"), url, polled, args.clients, ctx, idle, pids, upload_mb=args.upload_mb)
    )
    print("phase C done", flush=True)
    return phases


# ----------------------------------------------------------------------------------------------- report


def ms(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.1f}" if values else "-"


def assign_monitor_events(phases: list[Phase], events: list[dict[str, Any]]) -> int:
    """Give each phase the slow callbacks and full collections that ended inside it; returns how many slow
    callbacks ended outside every phase."""
    outside = 0
    for event in events:
        phase = next((p for p in phases if p.window[0] <= event["at"] <= p.window[1]), None)
        if "slow_callback" not in event:
            if phase is not None and event["generation"] == 2:
                phase.full_gcs.append(event)
        elif phase is None:
            outside += 1
        else:
            phase.slow.append(event)
    return outside


def overlaps_gc(callback: dict[str, Any], gcs: list[dict[str, Any]]) -> bool:
    """A full collection ended while the callback ran."""
    return any(callback["at"] - callback["wall_ms"] / 1000 <= gc["at"] <= callback["at"] for gc in gcs)


def report(phases: list[Phase], slow_callback_ms: float) -> None:
    header = [
        "phase",
        "seconds",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "/livez p50 ms",
        "/livez max ms",
        "loop probe max ms",
        f"loop callbacks > {slow_callback_ms:g} ms" if slow_callback_ms > 0 else "loop callbacks (off)",
        "full GCs",
        "full GC max ms",
        "errors",
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for phase in phases:
        livez = [latency for _, latency in phase.probe["livez"]]
        loop = [latency for _, latency in phase.probe["loop"]]
        row = [
            phase.name,
            f"{phase.seconds:.1f}",
            str(len(phase.latencies)),
            f"{len(phase.latencies) / phase.seconds:.0f}",
            ms(phase.latencies, 50),
            ms(phase.latencies, 99),
            ms(phase.latencies, 100),
            ms(livez, 50),
            ms(livez, 100),
            ms(loop, 100),
            str(len(phase.slow)) if slow_callback_ms > 0 else "-",
            str(len(phase.full_gcs)) if slow_callback_ms > 0 else "-",
            f"{max(gc['gc_pause_ms'] for gc in phase.full_gcs):.0f}" if phase.full_gcs else "-",
            str(phase.errors),
        ]
        print("| " + " | ".join(row) + " |")
    print()
    for phase in phases:
        parts = []
        for name, key in (("/livez", "livez"), ("loop probe", "loop")):
            samples = phase.probe[key]
            worst = max(samples, key=lambda sample: sample[1], default=(0.0, 0.0))
            slow = sum(latency > 0.1 for _, latency in samples)
            parts.append(f"{name}: worst {1000 * worst[1]:.0f} ms at t={worst[0]:.1f} s, {slow} over 100 ms")
        parts.append(f"probe errors {phase.probe['errors']}")
        print(f"- {phase.name}: {len(phase.probe['livez'])} probe rounds; " + "; ".join(parts))
        for note in phase.notes:
            print(f"  - {note}")
        if phase.slow:
            worst = max(phase.slow, key=lambda callback: callback["wall_ms"])
            in_gc = [callback for callback in phase.slow if overlaps_gc(callback, phase.full_gcs)]
            others = [callback for callback in phase.slow if callback not in in_gc]
            computing = sum(callback["cpu_ms"] > slow_callback_ms / 2 for callback in others)
            print(
                f"  - loop callbacks > {slow_callback_ms:g} ms: {len(in_gc)} during a full GC (in any thread),"
                f" {len(others)} others ({computing} on CPU, {len(others) - computing} waiting for a core or the"
                f" GIL); slowest {worst['wall_ms']:.0f} ms wall / {worst['cpu_ms']:.0f} ms CPU"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent pollers (default: 50)")
    parser.add_argument("--seconds", type=float, default=10, help="length of the idle and upload phases (default: 10)")
    parser.add_argument("--upload-mb", type=int, default=200, help="MiB per upload in phase C (default: 200)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--samples", type=int, default=200, help="clean samples given to Neural Cleanse")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: once the server is up, make its API process gc.freeze() its objects (via the monitor)",
    )
    parser.add_argument("--server-log", type=Path, metavar="FILE", help="keep the server's log (JSON lines) here")
    parser.add_argument(
        "--slow-callback-ms",
        type=float,
        default=100,
        help="report event-loop callbacks of the server longer than this (default: 100; 0: no loop monitor)",
    )
    args = parser.parse_args()
    if args.gc_freeze and args.slow_callback_ms <= 0:
        parser.error("--gc-freeze needs the loop monitor (--slow-callback-ms > 0)")

    model, data = prepare(args.samples)
    workers: list[int] = []
    pids: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bds-load-") as workdir:
        server = Server(Path(workdir), args.port or free_port(), args.slow_callback_ms, args.gc_freeze)
        try:
            started = time.perf_counter()
            server.start()
            if args.gc_freeze:
                server.freeze_gc()
            print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            print(
                f"server {server.url} ready in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs,"
                f" 1 worker, BDS_TORCH_THREADS=1; {args.clients} clients, {args.seconds:g} s idle/upload phases"
                + ("; API objects frozen (gc.freeze)" if args.gc_freeze else ""),
                flush=True,
            )
            assert server.process is not None
            workers = child_pids(server.process.pid)
            pids = {"API": server.process.pid, **{f"worker {pid}": pid for pid in workers}, "load": os.getpid()}
            phases = asyncio.run(bench(args, server.url, model, data, pids))
        except BaseException:
            print(f"--- server log (tail) ---\n{server.log()}", file=sys.stderr)
            raise
        finally:
            code = server.stop()
            events = server.monitor_events(pids["API"]) if pids else []
            if args.server_log is not None:
                shutil.copyfile(server.log_path, args.server_log)
            deadline = time.monotonic() + 30
            while workers and time.monotonic() < deadline:
                workers = [pid for pid in workers if alive(pid)]
                time.sleep(0.2)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        outside = assign_monitor_events(phases, events)
        report(phases, args.slow_callback_ms)
        if args.slow_callback_ms > 0:
            print(f"- loop callbacks > {args.slow_callback_ms:g} ms outside the phases (start-up, set-up): {outside}")
        print(f"\nserver stopped by SIGTERM: exit code {code}, worker processes left: {workers or 'none'}")


if __name__ == "__main__":
    main()
