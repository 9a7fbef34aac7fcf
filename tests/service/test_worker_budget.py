"""The worker's memory and its cancel latency on the largest sample set the limits allow, against a real ``serve``
and ``backdoor-scan worker`` process (issue 13: 199,999 samples sent the worker to 10.7 GB, and a cancel sent at
+5 s was not honoured after 300 s). Peak memory is the worker process's ``VmHWM`` from ``/proc``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scanner.testing.mnist import MnistSplit
from tests.factories import to_uint8, write_npz
from tests.servers import wait_for
from tests.service.conftest import Server, submit

SAMPLES = 199_999
#: The documented worker budget for this upload (README, "Memory"): 199,999 MNIST samples as float32 are 627 MB;
#: bench/worker_budget.py measured 2.6 GB at the peak.
WORKER_BUDGET_MB = 3_500


@pytest.fixture(scope="module")
def largest_set(mnist: MnistSplit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """199,999 real MNIST samples (the 1,000 test images repeated and shuffled), uint8, deflated."""
    repeats = -(-SAMPLES // len(mnist.test_labels))
    order = np.random.default_rng(0).permutation(SAMPLES)
    x = np.tile(to_uint8(mnist.test_images), (repeats, 1, 1, 1))[:SAMPLES][order]
    y = np.tile(mnist.test_labels.numpy(), repeats)[:SAMPLES][order]
    return write_npz(tmp_path_factory.mktemp("largest") / "samples.npz", x, y, compressed=True)


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_largest_sample_set_stays_in_budget_and_cancels_within_seconds(
    make_server: Callable[..., Server], service_files: dict[str, Path], largest_set: Path
) -> None:
    server = make_server()
    worker = server.start_worker()
    server.start(workers=0)
    worker.wait_consuming()
    files = {"model": service_files["badnets"], "data": largest_set, "training_data": largest_set}
    with server.client() as client:
        # the data-free test does not read the samples: left out, as it is not what this budget is about
        scope = {"nc_confirm_rounds": "0", "detectors": "neural_cleanse,spectral_signatures"}
        finished = wait_for(client, submit(client, files, **scope).json()["id"], timeout=600)
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["verdict"] == "backdoored"
        neural_cleanse = finished["result"]["detectors"]["neural_cleanse"]
        assert neural_cleanse["flagged_classes"] == [0]
        assert neural_cleanse["samples_used"] == 1000
        assert finished["result"]["detectors"]["spectral_signatures"]["status"] == "ok"
        peak = peak_mb(worker.pid)
        assert peak < WORKER_BUDGET_MB, f"worker peak {peak:.0f} MB"

        # a cancel in the phase that read every sample without a progress point (spectral features)
        scan_id = submit(client, files, seed="1", detectors="spectral_signatures").json()["id"]  # straight to it
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            scan = client.get(f"/v1/scans/{scan_id}").json()
            if scan["progress"]["stage"] == "spectral_signatures":
                break
            assert scan["status"] in ("queued", "running"), scan
            time.sleep(0.05)
        asked = time.monotonic()
        assert client.post(f"/v1/scans/{scan_id}/cancel").status_code == 202
        cancelled = wait_for(client, scan_id, timeout=60)
        latency = time.monotonic() - asked
    assert cancelled["status"] == "cancelled"
    assert latency < 5.0
