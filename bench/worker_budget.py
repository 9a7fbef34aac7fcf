"""Memory and cancel latency of the service on the largest and most hostile uploads it allows (issue 13).

Starts a real ``backdoor-scan serve`` (uvicorn + one worker process, ``BDS_TORCH_THREADS=1``) on loopback with a
fresh data directory for every case, so that each peak (``VmHWM`` of the API process and of the worker process, read
from ``/proc`` once the case is over) belongs to that case alone. The cases:

- ``clean 199,999``: a BadNets ``mnist_cnn`` (.pt2) with 199,999 MNIST samples (the real 5,000 repeated and
  shuffled, uint8, deflated) as the clean samples: the upload that sent the worker to 10.7 GB;
- ``training 199,999``: the same file as the training data (spectral signatures reads every sample);
- ``both 199,999``: the same file as both;
- ``model 470 MB``: a .pt2 MLP of 118M parameters (784 -> 150,000 -> 10) near the 512 MiB upload cap, no data;
- ``json bomb``: a .pt2 whose ``models/model.json`` is 60 MiB of ``{},`` deflated to 0.5 MB (refused at submit);
- ``650k members``: a zip of 650,000 empty members as the model (refused at submit).

Then the cancel latency of each scan phase: a scan of ``both 199,999`` is cancelled as soon as polling (every
50 ms) sees it enter the phase, and the time from the cancel request to the ``cancelled`` status is measured.

    .venv/bin/python bench/worker_budget.py [--skip-model]

Files are made once and kept in ``.bench-cache/worker-budget/`` (about 1 GB with the large model).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import API_KEY, ROOT, Server, child_pids, prepare

from tests.servers import FINAL, free_port, wait_for

CACHE = ROOT / ".bench-cache" / "worker-budget"
SAMPLES = 199_999
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def peak_mb(pid: int) -> float:
    """The process's peak resident memory so far (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def large_samples() -> Path:
    path = CACHE / f"mnist-{SAMPLES}.npz"
    if not path.exists():
        from scanner.testing.mnist import load_mnist_subset

        images, labels = load_mnist_subset()
        repeats = -(-SAMPLES // len(images))
        order = np.random.default_rng(0).permutation(SAMPLES)
        x = np.tile(images.reshape(-1, 28, 28).astype(np.uint8), (repeats, 1, 1))[:SAMPLES][order]
        y = np.tile(labels, repeats)[:SAMPLES][order]
        partial = path.with_suffix(".partial")
        with partial.open("wb") as handle:
            np.savez_compressed(handle, x=x, y=y)
        os.replace(partial, path)
    return path


def large_model() -> Path:
    path = CACHE / "mlp-118m.pt2"
    if not path.exists():
        import torch
        from torch import nn

        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 150_000), nn.ReLU(), nn.Linear(150_000, 10)).eval()
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
        partial = path.with_suffix(".partial")
        torch.export.save(program, partial)
        os.replace(partial, path)
    return path


def hostile_files() -> dict[str, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.malicious import build_json_bomb_pt2, build_many_member_zip

    bomb, many = CACHE / "json-bomb.pt2", CACHE / "650k-members.zip"
    if not bomb.exists():
        build_json_bomb_pt2(bomb, 60 * 1024**2)
    if not many.exists():
        build_many_member_zip(many, 650_000)
    return {"json bomb": bomb, "650k members": many}


@dataclass
class Case:
    name: str
    files: dict[str, Path]
    fields: dict[str, str]


@dataclass
class Outcome:
    case: str
    http: int
    status: str
    verdict_or_code: str
    seconds: float
    api_mb: float
    worker_mb: float


def started_server(workdir: Path) -> tuple[Server, int]:
    server = Server(workdir=workdir, port=free_port(), slow_callback_ms=0)
    server.start()
    assert server.process is not None
    workers = child_pids(server.process.pid)
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker process, found {workers}")
    return server, workers[0]


def submit(http: httpx.Client, files: dict[str, Path], fields: dict[str, str]) -> httpx.Response:
    handles = {name: path.open("rb") for name, path in files.items()}
    try:
        return http.post("/v1/scans", files={n: (p.name, handles[n]) for n, p in files.items()}, data=fields)
    finally:
        for handle in handles.values():
            handle.close()


def run_case(case: Case) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="bds-budget-") as workdir:
        server, worker = started_server(Path(workdir))
        assert server.process is not None
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=600) as http:
                started = time.monotonic()
                response = submit(http, case.files, case.fields)
                body = response.json()
                if response.status_code in (200, 202):
                    scan = wait_for(http, body["id"], timeout=1800, poll_s=0.5)
                    status = scan["status"]
                    result = scan["verdict"] if status == "succeeded" else (scan.get("error") or {}).get("code", "")
                else:
                    status, result = "refused", body.get("code", "")
                elapsed = time.monotonic() - started
            return Outcome(
                case.name,
                response.status_code,
                status,
                str(result),
                elapsed,
                peak_mb(server.process.pid),
                peak_mb(worker),
            )
        finally:
            server.stop()


def cancel_latencies(model: Path, samples: Path) -> list[tuple[str, float, str]]:
    """For each phase: seconds from the cancel request to ``cancelled``, and where the scan was when cancelled."""
    latencies = []
    with tempfile.TemporaryDirectory(prefix="bds-cancel-") as workdir:
        server, _ = started_server(Path(workdir))
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=600) as http:
                for seed, (stage, message) in enumerate(
                    [
                        ("data", ""),
                        ("neural_cleanse", "reversing"),
                        ("neural_cleanse", "attack success"),
                        ("spectral_signatures", "penultimate"),
                        ("spectral_signatures", "splits"),
                    ]
                ):
                    files = {"model": model, "data": samples, "training_data": samples}
                    fields = {"seed": str(seed + 1)}
                    if message == "attack success":
                        fields["nc_max_steps"] = "100"  # reach the end of the trigger search sooner
                    scan_id = submit(http, files, fields).json()["id"]
                    deadline = time.monotonic() + 900
                    while time.monotonic() < deadline:
                        scan = http.get(f"/v1/scans/{scan_id}").json()
                        progress = scan.get("progress") or {}
                        if progress.get("stage") == stage and message in progress.get("message", ""):
                            break
                        if scan["status"] in FINAL:
                            raise RuntimeError(f"scan finished before {stage}/{message}: {scan['status']}")
                        time.sleep(0.05)
                    asked = time.monotonic()
                    http.post(f"/v1/scans/{scan_id}/cancel")
                    final = wait_for(http, scan_id, timeout=1800, poll_s=0.5)
                    where = f"{progress.get('stage')}: {progress.get('message')}"
                    latencies.append((f"{stage} ({message or 'loading'})", time.monotonic() - asked, final["status"]))
                    print(f"  cancel in {where!r}: {latencies[-1][1]:.2f} s -> {final['status']}", flush=True)
        finally:
            server.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-model", action="store_true", help="leave out the 470 MB model (its build takes ~1 GB)")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    model, _ = prepare(200)
    samples = large_samples()
    cases = [
        Case("clean 199,999", {"model": model, "data": samples}, {}),
        Case("training 199,999", {"model": model, "training_data": samples}, {}),
        Case("both 199,999", {"model": model, "data": samples, "training_data": samples}, {}),
        *[Case(name, {"model": path}, {}) for name, path in hostile_files().items()],
    ]
    if not args.skip_model:
        cases.append(Case("model 470 MB", {"model": large_model()}, {}))

    flags = Path("/proc/cpuinfo").read_text().split()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, avx512_bf16: "
        f"{'avx512_bf16' in flags}; the worker with BDS_TORCH_THREADS=1; sizes: "
        f"{samples.name} {samples.stat().st_size / 1e6:.1f} MB",
        flush=True,
    )
    outcomes = []
    for case in cases:
        print(f"  {case.name} ...", flush=True)
        outcomes.append(run_case(case))
    latencies = cancel_latencies(model, samples)

    print("\n| upload | HTTP | status | verdict / code | seconds | API peak MB | worker peak MB |")
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.case} | {o.http} | {o.status} | {o.verdict_or_code} | {o.seconds:.1f} | {o.api_mb:.0f} "
            f"| {o.worker_mb:.0f} |"
        )
    print("\n| cancel sent in | seconds to cancelled | status |")
    print("|---|---|---|")
    for phase, seconds, status in latencies:
        print(f"| {phase} | {seconds:.2f} | {status} |")


if __name__ == "__main__":
    main()
