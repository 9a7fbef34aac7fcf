"""``backdoor-scan scan``: exit codes, JSON verdicts, and refusals of unsafe or corrupt files."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scanner.config import ModelOptions
from scanner.testing.mnist import MnistSplit
from service.cli import main
from tests.factories import BadNetsModel, to_uint8, write_npz
from tests.malicious import EXPECTED_FINDINGS, MALICIOUS_BUILDERS


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def scan_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out, err = run_cli(["scan", *argv, "--format", "json", "--device", "cpu"], capsys)
    assert code in (0, 1), err
    return code, json.loads(out)


@pytest.fixture(scope="module")
def mnist_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scanner.loading.architectures import build_architecture

    torch.manual_seed(0)
    model = build_architecture("mnist_cnn", 10)
    path = tmp_path_factory.mktemp("st") / "weights.bin"  # the name says nothing: the bytes decide
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def mnist_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scanner.loading.architectures import build_architecture

    torch.manual_seed(0)
    model = build_architecture("mnist_cnn", 10).eval()
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(program, path)
    return path


def test_scan_pt2_that_no_detector_can_decide_is_inconclusive(
    mnist_pt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, verdict = scan_json([str(mnist_pt2), "--detectors", "neural_cleanse,spectral_signatures"], capsys)
    assert code == 0
    assert verdict["verdict"] == "inconclusive"
    assert verdict["model"]["format"] == "pt2"
    assert verdict["detectors"]["model_file"]["status"] == "ok"
    assert verdict["detectors"]["model_file"]["findings"] == []
    assert verdict["detectors"]["neural_cleanse"] == {"status": "skipped", "reason": "no clean samples given (data)"}
    assert verdict["detectors"]["spectral_signatures"]["status"] == "skipped"
    assert verdict["scanner"]["device"] == "cpu"
    assert verdict["model"]["input_shape"] == [1, 28, 28]
    assert verdict["model"]["num_classes"] == 10


def test_scan_safetensors_with_arch(mnist_safetensors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, verdict = scan_json([str(mnist_safetensors), "--arch", "mnist_cnn"], capsys)
    assert code == 0
    assert verdict["model"]["format"] == "safetensors"
    assert verdict["model"]["num_classes"] == 10
    assert verdict["model"]["input_shape"] == [1, 28, 28]


def test_scan_text_report(mnist_safetensors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        ["scan", str(mnist_safetensors), "--arch", "mnist_cnn", "--device", "cpu", "--detectors", "neural_cleanse"],
        capsys,
    )
    assert code == 0
    assert out.startswith("weights.bin: INCONCLUSIVE")
    assert "neural_cleanse: skipped (no clean samples given (data))" in out


@pytest.mark.parametrize("name", sorted(MALICIOUS_BUILDERS))
def test_scan_refuses_malicious_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    path = MALICIOUS_BUILDERS[name](tmp_path, marker)
    code, out, err = run_cli(["scan", str(path), "--arch", "mnist_cnn", "--format", "json", "--device", "cpu"], capsys)
    assert not marker.exists(), "the payload ran"
    if code == 2:  # corrupt input is refused as an error with a stable code
        assert "[corrupt_file]" in err or "[unsupported_format]" in err, err
        return
    assert code == 1, err
    verdict = json.loads(out)
    assert verdict["verdict"] == "unsafe_file"
    member, global_name = EXPECTED_FINDINGS[name]
    findings = verdict["detectors"]["model_file"]["findings"]
    assert any(
        f["member"].endswith(member) and any(global_name in named for named in f["globals"]) for f in findings
    ), findings
    assert verdict["detectors"]["neural_cleanse"]["status"] == "skipped"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_file"),
        (b"\x00garbage that is no model at all" * 10, "unsupported_format"),
        (b"PK\x03\x04truncated zip", "corrupt_file"),
    ],
)
def test_scan_bad_file_exits_2_with_code(
    content: bytes, code: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    status, out, err = run_cli(["scan", str(path), "--arch", "mnist_cnn"], capsys)
    assert status == 2
    assert out == ""
    assert err.strip().splitlines()[-1].startswith(f"backdoor-scan: error [{code}]: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--arch", "no_such_net"], "unknown_architecture"),
        ([], "unknown_architecture"),  # a state_dict needs --arch
        (["--arch", "mnist_cnn", "--num-classes", "7"], "invalid_option"),  # the weights say 10
        (["--arch", "mnist_cnn", "--input-shape", "1,28"], "invalid_option"),
        (["--arch", "mnist_cnn", "--mean", "0.5"], "invalid_option"),  # mean without std
        (["--arch", "mnist_cnn", "--mean", "nan", "--std", "0.5"], "invalid_option"),
        (["--arch", "mnist_cnn", "--mean", "0.5", "--std", "inf"], "invalid_option"),
        (["--arch", "mnist_cnn", "--mean", "0.5", "--std", "1e-320"], "invalid_option"),
        (["--arch", "mnist_cnn", "--mean", "1e308", "--std", "1e-308"], "invalid_option"),
        (["--arch", "mnist_cnn", "--device", "tpu"], "invalid_option"),
        (["--arch", "mnist_cnn", "--format", "xml"], "invalid_option"),
        (["--arch", "mnist_cnn", "--data", "/no/such/file.npz"], "invalid_option"),
    ],
)
def test_scan_bad_options_exit_2_with_code(
    argv: list[str], code: str, mnist_safetensors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(["scan", str(mnist_safetensors), *argv], capsys)
    assert status == 2
    assert f"backdoor-scan: error [{code}]: " in err
    assert "Traceback" not in err


def test_console_script_exit_codes(tmp_path: Path) -> None:
    """The installed entry point, in its own process: 1 for an unsafe file, 2 for a missing --arch."""
    marker = tmp_path / "MARKER"
    unsafe = MALICIOUS_BUILDERS["os_system"](tmp_path, marker)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "scan", str(unsafe), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["verdict"] == "unsafe_file"
    assert not marker.exists()


def test_scan_with_data_flags_the_backdoor(
    badnets: BadNetsModel, mnist: MnistSplit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: a BadNets model exported as .pt2 plus 200 clean samples -> exit 1, target class flagged."""
    program = torch.export.export(
        badnets.model, (mnist.test_images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    model_path = tmp_path / "badnets.pt2"
    torch.export.save(program, model_path)
    data = write_npz(tmp_path / "clean.npz", to_uint8(mnist.test_images[:200]), mnist.test_labels[:200].numpy())
    artifacts = tmp_path / "artifacts"
    code, verdict = scan_json([str(model_path), "--data", str(data), "--artifacts", str(artifacts)], capsys)
    assert code == 1
    assert verdict["verdict"] == "backdoored"
    assert verdict["flagged_classes"] == [badnets.target]
    nc = verdict["detectors"]["neural_cleanse"]
    assert nc["status"] == "ok"
    assert nc["flagged_classes"] == [badnets.target]
    assert nc["anomaly_scale"] == "log"
    assert nc["rounds"] in (1, 2)  # a second round only for a close call
    flagged = next(c for c in nc["classes"] if c["class"] == badnets.target)
    assert flagged["flagged"] is True
    assert flagged["mask"]["shape"] == [28, 28]
    assert base64.b64decode(flagged["mask"]["png_base64"]).startswith(b"\x89PNG")
    assert all("mask" not in c for c in nc["classes"] if not c["flagged"])  # full masks only in artifacts
    assert (artifacts / "verdict.json").is_file()
    for k in range(10):
        assert (artifacts / f"nc-class-{k}-mask.png").read_bytes().startswith(b"\x89PNG")
        mask = np.load(artifacts / f"nc-class-{k}-mask.npy", allow_pickle=False)
        assert mask.shape == (28, 28)
    assert json.loads((artifacts / "verdict.json").read_text()) == verdict


def test_scan_with_data_passes_the_clean_model(
    clean_model: torch.nn.Module, mnist: MnistSplit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = tmp_path / "clean.safetensors"
    save_file({f"module.{k}": v for k, v in clean_model.state_dict().items()}, str(model_path))  # DataParallel
    data = write_npz(tmp_path / "clean.npz", to_uint8(mnist.test_images[:200]), mnist.test_labels[:200].numpy())
    code, verdict = scan_json([str(model_path), "--arch", "mnist_cnn", "--data", str(data)], capsys)
    assert code == 0
    assert verdict["verdict"] == "clean"
    assert verdict["flagged_classes"] == []
    assert verdict["detectors"]["neural_cleanse"]["flagged_classes"] == []


def test_scan_data_that_does_not_fit_the_model(
    mnist_safetensors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_npz(tmp_path / "rgb.npz", np.zeros((4, 3, 32, 32), dtype=np.uint8), np.zeros(4, dtype=np.int64))
    status, _, err = run_cli(["scan", str(mnist_safetensors), "--arch", "mnist_cnn", "--data", str(data)], capsys)
    assert status == 2
    assert "[data_model_mismatch]" in err


def test_scan_torchscript_needs_trust_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scanner.loading.architectures import build_architecture

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(build_architecture("mnist_cnn", 10).eval()), str(path))
    status, _, err = run_cli(["scan", str(path), "--input-shape", "1,28,28"], capsys)
    assert status == 2
    assert "[trust_required]" in err
    code, verdict = scan_json([str(path), "--input-shape", "1,28,28", "--trust-code"], capsys)
    assert code == 0
    assert verdict["model"]["format"] == "torchscript"
    assert verdict["model"]["num_classes"] == 10


def test_scan_with_training_data_finds_the_poison(
    badnets: BadNetsModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: spectral signatures on the poisoned training set name the target class and the samples."""
    model_path = tmp_path / "badnets.safetensors"
    save_file(badnets.model.state_dict(), str(model_path))
    poisoned = badnets.poisoned
    train = write_npz(tmp_path / "train.npz", to_uint8(poisoned.images), poisoned.labels.numpy())
    artifacts = tmp_path / "artifacts"
    argv = [str(model_path), "--arch", "mnist_cnn", "--training-data", str(train), "--artifacts", str(artifacts)]
    code, verdict = scan_json(argv, capsys)
    assert code == 1
    assert verdict["verdict"] == "backdoored"
    spectral = verdict["detectors"]["spectral_signatures"]
    assert spectral["status"] == "ok"
    assert spectral["flagged_classes"] == [badnets.target]
    assert verdict["detectors"]["neural_cleanse"]["status"] == "skipped"
    written = {p.name for p in artifacts.iterdir()}
    assert "verdict.json" in written
    assert any(name.startswith("spectral") for name in written), written


def test_a_backdoored_checkpoint_alone_fails_the_gate(
    service_files: dict[str, Path], badnets: BadNetsModel, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 16: no data at all, and the data-free test finds the target."""
    artifacts = tmp_path / "artifacts"
    code, verdict = scan_json([str(service_files["badnets"]), "--artifacts", str(artifacts)], capsys)
    assert code == 1
    assert verdict["verdict"] == "backdoored"
    assert verdict["flagged_classes"] == [badnets.target]
    assert verdict["detectors"]["neural_cleanse"]["status"] == "skipped"
    assert verdict["detectors"]["max_margin"]["flagged_classes"] == [badnets.target]
    assert (artifacts / f"mm-class-{badnets.target}-input.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # a scan, a repair and a re-scan (~1.5 min on 2 cores); the REST test covers the same path
def test_repair_gives_back_a_model_that_scans_clean(
    badnets: BadNetsModel, mnist: MnistSplit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``backdoor-scan repair`` on a state_dict: the .pt2 and the .safetensors are written, the real trigger is gone."""
    from scanner.loading import load_model
    from scanner.trigger import attack_success_rate

    model_path = tmp_path / "badnets.safetensors"
    save_file(badnets.model.state_dict(), str(model_path))
    data = write_npz(tmp_path / "clean.npz", to_uint8(mnist.test_images[:500]), mnist.test_labels[:500].numpy())
    output, report = tmp_path / "out" / "fixed.pt2", tmp_path / "repair.html"
    argv = ["repair", str(model_path), "--arch", "mnist_cnn", "--data", str(data), "--output", str(output)]
    code, out, err = run_cli([*argv, "--device", "cpu", "--format", "json", "--report", str(report)], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["repaired"] is True
    assert summary["classes"] == [badnets.target]
    assert summary["files"] == [str(output), str(output.with_suffix(".safetensors"))]
    assert summary["rescan"]["verdict"] == "clean"
    repaired = load_model(output, ModelOptions(), torch.device("cpu")).module
    unseen_images, unseen_labels = mnist.test_images[500:], mnist.test_labels[500:]
    cpu = torch.device("cpu")
    assert (
        attack_success_rate(repaired, unseen_images, unseen_labels, badnets.trigger, badnets.target, device=cpu) < 0.1
    )
    weights = load_model(output.with_suffix(".safetensors"), ModelOptions(arch="mnist_cnn"), cpu).module
    assert torch.allclose(repaired(unseen_images[:8]), weights(unseen_images[:8]), atol=1e-4)
    page = report.read_text()
    assert 'id="repair"' in page
    assert "the re-scan flags nothing" in page
    assert not list(output.parent.glob(".repair-*"))  # the work directory is gone


@pytest.mark.slow  # a whole Neural Cleanse scan
def test_repair_of_a_clean_model_writes_nothing(
    clean_model: torch.nn.Module, mnist: MnistSplit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = tmp_path / "clean.safetensors"
    save_file(clean_model.state_dict(), str(model_path))
    data = write_npz(tmp_path / "clean.npz", to_uint8(mnist.test_images[:200]), mnist.test_labels[:200].numpy())
    output = tmp_path / "fixed.pt2"
    argv = ["repair", str(model_path), "--arch", "mnist_cnn", "--data", str(data), "--output", str(output)]
    code, out, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "nothing to repair" in out
    assert not output.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-accuracy-drop", "0.5"], "[invalid_option]"),
        (["--max-accuracy-drop", "nan"], "[invalid_option]"),
        (["--mean", "0.5"], "[invalid_option]"),
    ],
)
def test_repair_bad_options_exit_2(
    argv: list[str], message: str, mnist_safetensors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_npz(tmp_path / "clean.npz", np.zeros((4, 28, 28), np.uint8), np.arange(4))
    base = ["repair", str(mnist_safetensors), "--arch", "mnist_cnn", "--data", str(data), "--output", "x.pt2"]
    status, _, err = run_cli([*base, *argv], capsys)
    assert status == 2
    assert message in err
    assert "Traceback" not in err
    assert not Path("x.pt2").exists()
