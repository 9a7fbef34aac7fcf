"""The ``backdoor-scan`` command line.

Exit codes (the convention model scanners in pipelines use): 0 clean (or inconclusive), 1 findings
(``backdoored`` or ``unsafe_file``), 2 error (bad input or options; one line on stderr with the error code).
``submit`` chooses which verdicts are findings with ``--fail-on`` (default ``backdoored,unsafe_file``); its
errors (network, a refused request, a failed or cancelled scan, ``--timeout``) exit 2 the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from scanner.verdict import Verdict
    from service.config import Settings
    from service.options import ScanOptions

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

logger = logging.getLogger("backdoor_scan")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow our one-line ``error [code]: detail`` convention (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _fail("invalid_option", message)


def _fail(code: str, detail: str) -> NoReturn:
    print(f"backdoor-scan: error [{code}]: {detail}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return values


def _shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W integers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W (3 integers), got {text!r}")
    return (values[0], values[1], values[2])


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backdoor-scan", description="Scan image-classifier checkpoints for backdoors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and tracebacks to stderr")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    scan = commands.add_parser("scan", help="scan a checkpoint locally (no server)")
    _add_model_flags(scan)
    scan.add_argument("--data", type=_existing_file, metavar="FILE", help="clean samples (.npz or ImageFolder .zip)")
    scan.add_argument("--training-data", type=_existing_file, metavar="FILE", help="training set to inspect")
    scan.add_argument("--trust-code", action="store_true", help="allow TorchScript, which runs code when loaded")
    _add_detector_flags(scan)
    scan.add_argument(
        "--format", choices=("json", "text", "sarif"), default="text", help="report format (default: text)"
    )
    scan.add_argument("--artifacts", type=Path, metavar="DIR", help="write verdict.json and detector artifacts here")
    scan.add_argument(
        "--report", type=Path, metavar="FILE.html", help="write the HTML report (one self-contained page) here"
    )
    scan.set_defaults(handler=_cmd_scan)

    _add_submit_parser(commands)
    _add_repair_parser(commands)

    serve = commands.add_parser("serve", help="run the API with embedded workers (settings: BDS_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes to start beside the API (default: 1)")
    serve.set_defaults(handler=_cmd_serve)

    worker = commands.add_parser("worker", help="run a scan worker (settings: BDS_* variables)")
    worker.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: BDS_DEVICE, else auto)")
    worker.add_argument("--threads", type=int, help="scans this process runs at a time (default: BDS_WORKER_THREADS)")
    worker.set_defaults(handler=_cmd_worker)
    return parser


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model file and how to load it (``scan`` and ``repair``)."""
    parser.add_argument("model", type=_existing_file, help="checkpoint: .pt2, safetensors, torch.save state_dict")
    parser.add_argument("--arch", help="architecture for state_dicts (mnist_cnn, cifar_cnn, resnet18, ...)")
    parser.add_argument("--num-classes", type=int, help="class count for --arch (default: read from the weights)")
    parser.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="shape of one input image")
    parser.add_argument("--mean", type=_floats, metavar="M1,M2,..", help="per-channel normalisation mean")
    parser.add_argument("--std", type=_floats, metavar="S1,S2,..", help="per-channel normalisation std")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_repair_parser(commands: Any) -> None:
    from scanner.config import RepairConfig

    repair = commands.add_parser(
        "repair",
        help="remove a backdoor locally: scan, unlearn the flagged classes' reversed triggers and margins, re-scan",
        description="Scan MODEL with Neural Cleanse on --data and the data-free test; fine-tune it on --data with "
        "each flagged class's reversed trigger stamped on (unlearning) and its largest margin held down, check it on "
        "held-out samples, write it to --output (.pt2; "
        "a state_dict input also gets a .safetensors beside it) and scan the written file again. Exit 0: repaired "
        "(the re-scan flags nothing) or nothing to repair; 1: the re-scan still flags a class (the file is written); "
        "2: an error, or a repair that cost more clean accuracy than --max-accuracy-drop (nothing written).",
    )
    _add_model_flags(repair)
    repair.add_argument(
        "--data",
        type=_existing_file,
        metavar="FILE",
        required=True,
        help="clean labelled samples (.npz or ImageFolder .zip); the more the better (500 or more)",
    )
    repair.add_argument("--output", type=Path, metavar="FILE.pt2", required=True, help="where the repaired model goes")
    repair.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=RepairConfig().max_accuracy_drop,
        metavar="X",
        help=f"refuse a repair that costs more held-out clean accuracy than this (0..0.1; default "
        f"{RepairConfig().max_accuracy_drop})",
    )
    repair.add_argument("--format", choices=("json", "text"), default="text", help="summary format (default: text)")
    repair.add_argument(
        "--report", type=Path, metavar="FILE.html", help="write the HTML report with its repair section here"
    )
    repair.set_defaults(handler=_cmd_repair, trust_code=False)


def _add_detector_flags(parser: argparse.ArgumentParser) -> None:
    """The detector options of ``scan`` and ``submit``: the ``ScanOptions`` fields of the same names, which the API
    takes as form fields (validated there, and in ``scan`` by the same model)."""
    parser.add_argument(
        "--detectors",
        metavar="NAME,..",
        help="backdoor detectors to run: neural_cleanse,spectral_signatures,max_margin (default: all that can run; "
        "max_margin needs no data)",
    )
    parser.add_argument("--nc-restarts", type=int, metavar="N", help="Neural Cleanse restarts per class (1-5)")
    parser.add_argument(
        "--nc-confirm-rounds",
        type=int,
        metavar="N",
        help="Neural Cleanse rounds added when the decision is close (0-5; default 1)",
    )
    parser.add_argument(
        "--nc-precision",
        choices=("auto", "fp32", "bf16"),
        help="Neural Cleanse model passes (default auto: bf16 on CPUs with native bf16)",
    )
    parser.add_argument(
        "--nc-max-steps", type=int, metavar="N", help="Neural Cleanse step limit per class (100-10000; default 1000)"
    )
    parser.add_argument(
        "--nc-anomaly-threshold",
        type=float,
        metavar="X",
        help="fixed Neural Cleanse anomaly-index threshold (default: calibrated to the class count)",
    )
    parser.add_argument(
        "--spectral-threshold", type=float, metavar="X", help="spectral signatures separation threshold (default 2)"
    )


#: The ``ScanOptions`` fields that ``scan`` and ``submit`` take as flags (``--num-classes`` is ``num_classes``).
OPTION_FLAGS = (
    "arch",
    "num_classes",
    "input_shape",
    "mean",
    "std",
    "seed",
    "trust_code",
    "detectors",
    "nc_restarts",
    "nc_confirm_rounds",
    "nc_precision",
    "nc_max_steps",
    "nc_anomaly_threshold",
    "spectral_threshold",
)

#: Verdicts ``submit --fail-on`` may name.
FAIL_ON_LABELS = ("backdoored", "unsafe_file", "inconclusive")


def _fail_on(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip() and name.strip() != "none")
    unknown = sorted(names - set(FAIL_ON_LABELS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown verdict(s) {', '.join(unknown)}: choose from {', '.join(FAIL_ON_LABELS)} (or none)"
        )
    return names


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected 0 to 100 retries, got {text!r}")
    return value


def _add_submit_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    submit = commands.add_parser(
        "submit",
        help="upload a checkpoint to a backdoor-scan server, wait for the verdict, and gate on it",
        description="Upload a checkpoint to a backdoor-scan server. The scan's URL goes to stderr; with --wait the"
        " report goes to stdout (or --output). Exit 0: no finding in --fail-on; 1: a verdict in --fail-on;"
        " 2: an error (unreachable server, refused request, failed or cancelled scan, --timeout).",
    )
    submit.add_argument("model", type=_existing_file, help="checkpoint: .pt2, safetensors, torch.save state_dict")
    submit.add_argument("--data", type=_existing_file, metavar="FILE", help="clean samples (.npz or ImageFolder .zip)")
    submit.add_argument("--training-data", type=_existing_file, metavar="FILE", help="training set to inspect")
    submit.add_argument("--arch", help="architecture for state_dicts (mnist_cnn, cifar_cnn, resnet18, ...)")
    submit.add_argument("--num-classes", type=int, help="class count for --arch (default: read from the weights)")
    submit.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="shape of one input image")
    submit.add_argument("--mean", type=_floats, metavar="M1,M2,..", help="per-channel normalisation mean")
    submit.add_argument("--std", type=_floats, metavar="S1,S2,..", help="per-channel normalisation std")
    submit.add_argument("--seed", type=int, help="random seed (default: the server's, 0)")
    submit.add_argument("--trust-code", action="store_true", help="TorchScript (the server must allow it)")
    _add_detector_flags(submit)
    submit.add_argument("--server", metavar="URL", help="the service's base URL (default: $BDS_SERVER)")
    submit.add_argument("--api-key", metavar="KEY", help="API key (default: $BDS_API_KEY; prefer the variable)")
    submit.add_argument("--wait", action="store_true", help="follow the scan and print its report (else: the scan)")
    submit.add_argument(
        "--timeout", type=_positive, metavar="S", help="with --wait: give up (exit 2) after S seconds (default: none)"
    )
    submit.add_argument(
        "--fail-on",
        type=_fail_on,
        default=frozenset({"backdoored", "unsafe_file"}),
        metavar="V,..",
        help="verdicts that exit 1: backdoored, unsafe_file, inconclusive, or none (default: backdoored,unsafe_file)",
    )
    submit.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="report format")
    submit.add_argument("--output", type=Path, metavar="FILE", help="write the report here instead of stdout")
    submit.add_argument(
        "--retries",
        type=_retries,
        default=5,
        metavar="N",
        help="retries per request on connection errors and 429/502/503/504, with exponential backoff (default: 5)",
    )
    submit.add_argument("--poll-interval", type=_positive, default=1.0, metavar="S", help=argparse.SUPPRESS)
    submit.set_defaults(handler=_cmd_submit)


def _service_settings(**overrides: object) -> Settings:
    from service.config import get_settings
    from service.logs import configure_logging

    settings = get_settings()
    updates = {name: value for name, value in overrides.items() if value is not None}
    if updates:
        settings = settings.model_validate({**settings.model_dump(), **updates})
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _local_api_key(data_dir: Path) -> str:
    """The embedded server's own API key: made once, kept (mode 0600) in the data directory."""
    path = data_dir / "api-key"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    key = f"bds_{secrets.token_urlsafe(24)}"
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def _die_with_parent() -> None:
    """In a worker child: get SIGTERM when the serving process dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _WorkerSupervisor:
    """The embedded workers of ``serve``: child processes, restarted when one dies (its scan is then
    re-queued by the reaper of a live worker once its heartbeat goes stale)."""

    def __init__(self, count: int):
        self.count = count
        self._processes: list[subprocess.Popen[bytes] | None] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    @staticmethod
    def _spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], preexec_fn=_die_with_parent)

    def start(self) -> None:
        self._processes = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for index, process in enumerate(self._processes):
                if process is None or process.poll() is None or self._stopping.is_set():
                    continue
                if process.returncode == EXIT_ERROR:  # a settings error (a GPU this machine lacks): it would repeat
                    logger.error(
                        "worker process %d refused to start (its error is above); not restarting it", process.pid
                    )
                    self._processes[index] = None
                    continue
                logger.error("worker process %d exited with %s; starting another", process.pid, process.returncode)
                self._processes[index] = self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        running = [process for process in self._processes if process is not None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _service_settings()
    key_note = ""
    if settings.auth_disabled:
        print(
            "backdoor-scan: WARNING: authentication is DISABLED (BDS_AUTH_DISABLED): anyone who can reach this"
            " port can submit and read scans",
            file=sys.stderr,
        )
    elif not settings.api_keys:
        key = _local_api_key(settings.data_dir)
        settings = settings.model_copy(update={"api_keys": (key,)})
        key_note = f"API key:    {key}   (kept in {settings.data_dir / 'api-key'}; set BDS_API_KEYS to choose your own)"
    else:
        key_note = f"API keys:   {len(settings.api_keys)} from BDS_API_KEYS"
    app = create_app(settings)
    workers = _WorkerSupervisor(max(0, args.workers))
    url = f"http://{args.host}:{args.port}"
    print(f"backdoor-scan serving on {url}   (web page: {url}/   Swagger UI: {url}/docs)", flush=True)
    if key_note:
        print(key_note, flush=True)
    print(f"data:       {settings.data_dir.resolve()}   workers: {workers.count}", flush=True)
    workers.start()
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with this handler in place that ends
    # in the `finally` below (workers stopped, exit 0) instead of killing the process there and then
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # the API process holds torch's ~200k objects: freeze them out of the collector, whose full passes
    # otherwise stalled the event loop for 100-600 ms every few seconds under load (bench/service_load.py)
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, timeout_graceful_shutdown=10)
    finally:
        workers.stop()
    return EXIT_CLEAN


def _cmd_worker(args: argparse.Namespace) -> int:
    from scanner.device import resolve_device
    from scanner.errors import ScannerError
    from service.worker import run_worker

    settings = _service_settings(device=args.device, worker_threads=args.threads)
    try:  # a worker for a GPU this machine lacks would fail every scan it claims: refuse to start instead
        resolve_device(settings.device)
    except ScannerError as exc:
        _fail(exc.code, exc.detail)
    run_worker(settings)
    return EXIT_CLEAN


def scan_options(args: argparse.Namespace) -> ScanOptions:
    """The options of ``scan``'s flags, validated by the model that validates the API's form fields.

    Raises:
        OptionsError: an option is out of range (an ``invalid_option`` error).
    """
    from service.options import parse_options

    return parse_options({name: value for name in OPTION_FLAGS if (value := getattr(args, name, None)) is not None})


def _cmd_scan(args: argparse.Namespace) -> int:
    from scanner import resolve_device, scan
    from scanner.render.text import render_text, write_artifacts
    from service.options import scan_config

    options = scan_options(args)
    config = scan_config(options)
    device = resolve_device(args.device)

    def progress(fraction: float, stage: str, message: str) -> None:
        logger.info("%3.0f%% %s: %s", 100 * fraction, stage, message)

    verdict = scan(
        args.model,
        config,
        device,
        data_path=args.data,
        training_data_path=args.training_data,
        progress=progress,
    )
    if args.artifacts is not None:
        write_artifacts(verdict, args.artifacts)
    if args.report is not None:
        _write_report(verdict, args, options)
    if args.format == "json":
        print(json.dumps(verdict.to_dict(), indent=2))
    elif args.format == "sarif":
        from scanner.render.sarif import sarif_log

        print(json.dumps(sarif_log(verdict.to_dict(), args.model, base=Path.cwd()), indent=2))
    else:
        print(render_text(verdict.to_dict(), args.model.name))
    return EXIT_FINDINGS if verdict.has_findings else EXIT_CLEAN


def _cmd_repair(args: argparse.Namespace) -> int:
    from scanner import resolve_device, scan
    from scanner.repair import REPAIRED_PT2, REPAIRED_SAFETENSORS, RESCAN_DETECTORS, read_triggers, repair_checkpoint
    from scanner.verdict import reversed_trigger_classes
    from service.options import RepairOptions, parse_fields, scan_config

    options = scan_options(args)
    repair_options = parse_fields(RepairOptions, {"max_accuracy_drop": args.max_accuracy_drop})
    config = replace(scan_config(options), detectors=RESCAN_DETECTORS)
    device = resolve_device(args.device)

    def progress(fraction: float, stage: str, message: str) -> None:
        logger.info("%3.0f%% %s: %s", 100 * fraction, stage, message)

    verdict = scan(args.model, config, device, data_path=args.data, progress=progress)
    found = verdict.detectors["neural_cleanse"]
    if found.status.value == "error" and not verdict.flagged_classes:
        _fail(found.code or "scanner_error", f"Neural Cleanse could not decide, so there is no trigger to unlearn: "
              f"{found.detail}")  # fmt: skip
    if not verdict.flagged_classes:
        print(f"backdoor-scan: no class of {args.model.name} is flagged: nothing to repair, nothing written")
        return EXIT_CLEAN
    # Neural Cleanse reverses every class (but those a many-class scan screened out): each flagged class's trigger,
    # whichever detector flagged it; the repair reverses the others' itself
    reversed_ = reversed_trigger_classes(found.status.value, found.details.get("classes"))
    with_trigger = [k for k in verdict.flagged_classes if k in reversed_]
    triggers = read_triggers(with_trigger, found.artifacts.__getitem__)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output.parent, prefix=".repair-") as work:
        report = repair_checkpoint(
            args.model,
            args.data,
            triggers,
            Path(work),
            classes=verdict.flagged_classes,
            scan_config=scan_config(options),
            config=repair_options.config(),
            device=device,
            progress=progress,
        )
        written = [args.output]
        os.replace(Path(work) / REPAIRED_PT2, args.output)
        if REPAIRED_SAFETENSORS in report.files:
            written.append(args.output.with_suffix(".safetensors"))
            os.replace(Path(work) / REPAIRED_SAFETENSORS, written[-1])
    summary = report.to_dict()
    summary["files"] = [str(path) for path in written]
    if args.report is not None:
        from scanner.render.html import render_html

        artifacts = {name: data for result in verdict.detectors.values() for name, data in result.artifacts.items()}
        rescan_artifacts = {name: data for r in report.rescan.detectors.values() for name, data in r.artifacts.items()}
        page = render_html(
            verdict.to_dict(),
            artifacts,
            title=args.model.name,
            settings={"model file": args.model.name, "clean samples (data)": args.data.name},
            repair=summary,
            repair_artifacts=rescan_artifacts,
        )
        args.report.write_text(page, encoding="utf-8")
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(_repair_text(summary))
    return EXIT_CLEAN if report.repaired else EXIT_FINDINGS


def _repair_text(summary: dict[str, Any]) -> str:
    accuracy = summary["clean_accuracy"]
    lines = [
        f"repaired: {'yes' if summary['repaired'] else 'no, the re-scan still flags a class'}"
        f" ({summary['rounds']} round(s) of unlearning the reversed trigger of class"
        f" {', '.join(map(str, summary['classes']))})",
        f"clean accuracy (held out, {summary['samples']['held_out']} samples): {accuracy['before']:.3f} ->"
        f" {accuracy['after']:.3f} (bound: {accuracy['max_drop']} lost at most)",
    ]
    for target, rate in summary["trigger_attack_success_rate"].items():
        lines.append(f"class {target}'s reversed trigger, attack success rate: {rate['before']} -> {rate['after']}")
    for target, cap in (summary.get("margin_caps") or {}).items():
        lines.append(
            f"class {target}'s largest margin held under {cap} (margin term weight {summary['margin_weight']})"
        )
    rescan = summary["rescan"]
    flagged = ", ".join(map(str, rescan["flagged_classes"])) or "none"
    lines.append(f"re-scan of the written model: {rescan['verdict']} (flagged classes: {flagged})")
    lines.append(f"written: {', '.join(summary['files'])}")
    return "\n".join(lines)


def _write_report(verdict: Verdict, args: argparse.Namespace, options: ScanOptions) -> None:
    """``scan --report FILE``: the page ``GET /v1/scans/{id}/report`` serves, for a local scan (the options shown
    as the API stores a scan's: those not at their defaults; and the device)."""
    from scanner.render.html import render_html

    settings = {
        "model file": args.model.name,
        "clean samples (data)": args.data.name if args.data else None,
        "training data": args.training_data.name if args.training_data else None,
        "options": {**options.model_dump(mode="json", exclude_defaults=True), "device": args.device},
    }
    artifacts = {name: content for result in verdict.detectors.values() for name, content in result.artifacts.items()}
    page = render_html(verdict.to_dict(), artifacts, title=args.model.name, settings=settings)
    args.report.write_text(page, encoding="utf-8")


def _submit_fields(args: argparse.Namespace) -> dict[str, str]:
    """The scan options of ``submit`` as the form fields of ``POST /v1/scans``."""
    fields: dict[str, str] = {}
    if args.arch is not None:
        fields["arch"] = args.arch
    if args.num_classes is not None:
        fields["num_classes"] = str(args.num_classes)
    if args.input_shape is not None:
        fields["input_shape"] = ",".join(map(str, args.input_shape))
    for name in ("mean", "std"):
        values = getattr(args, name)
        if values is not None:
            fields[name] = ",".join(repr(v) for v in values)
    if args.seed is not None:
        fields["seed"] = str(args.seed)
    if args.trust_code:
        fields["trust_code"] = "true"
    if args.detectors:
        fields["detectors"] = args.detectors
    for name in ("nc_restarts", "nc_confirm_rounds", "nc_precision", "nc_max_steps"):
        if (value := getattr(args, name)) is not None:
            fields[name] = str(value)
    for name in ("nc_anomaly_threshold", "spectral_threshold"):
        if (value := getattr(args, name)) is not None:
            fields[name] = repr(value)
    return fields


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        print(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")


def _report(verdict: dict[str, Any], args: argparse.Namespace) -> int:
    """Print (or write) the report of a verdict dict and return the exit code ``--fail-on`` gives it."""
    from scanner.render.text import render_text

    if args.format == "json":
        text = json.dumps(verdict, indent=2)
    elif args.format == "sarif":
        from scanner.render.sarif import sarif_log

        text = json.dumps(sarif_log(verdict, args.model, base=Path.cwd()), indent=2)
    else:
        text = render_text(verdict, args.model.name)
    _emit(text, args.output)
    label = str(verdict.get("verdict"))
    flagged = verdict.get("flagged_classes") or []
    summary = f"verdict {label}" + (f" (flagged classes: {', '.join(map(str, flagged))})" if flagged else "")
    if args.output is not None:
        print(f"backdoor-scan: {summary}; report written to {args.output}", file=sys.stderr)
    if label in args.fail_on:
        return EXIT_FINDINGS
    if label in FAIL_ON_LABELS:
        fail_on = ",".join(sorted(args.fail_on)) or "none"
        print(f"backdoor-scan: note: {summary} is not in --fail-on ({fail_on}): exit 0", file=sys.stderr)
    return EXIT_CLEAN


def _cmd_submit(args: argparse.Namespace) -> int:
    from scanner.digest import file_digest
    from scanner.render.sarif import verdict_from_problem
    from service.client import ClientError, ProblemError, ProgressPrinter, RetryPolicy, ScanClient

    server = args.server or os.environ.get("BDS_SERVER")
    if not server:
        _fail("invalid_option", "--server URL is required (or set BDS_SERVER)")
    if not server.startswith(("http://", "https://")):
        _fail("invalid_option", f"--server must be an http:// or https:// URL, got {server!r}")
    api_key = args.api_key or os.environ.get("BDS_API_KEY") or None

    def on_retry(error: ClientError, delay: float) -> None:
        print(f"backdoor-scan: {error.detail}; retrying in {delay:.1f} s", file=sys.stderr, flush=True)

    client = ScanClient(server, api_key, retry=RetryPolicy(retries=args.retries), on_retry=on_retry)
    with client:
        try:
            try:
                submission = client.submit(
                    args.model, data=args.data, training_data=args.training_data, options=_submit_fields(args)
                )
            except ProblemError as exc:
                if exc.code != "unsafe_file":
                    raise
                sha256, size = file_digest(args.model)
                print(f"backdoor-scan: the server refused {args.model} as unsafe: {exc.detail}", file=sys.stderr)
                return _report(verdict_from_problem(exc.problem, sha256, size), args)
            scan = submission.scan
            how = "submitted" if submission.created else "already submitted"
            print(f"backdoor-scan: {how}: {submission.url} ({scan.get('status')})", file=sys.stderr, flush=True)
            if not args.wait:
                _emit(json.dumps(scan, indent=2), args.output)
                return EXIT_CLEAN
            progress = ProgressPrinter(sys.stderr, sys.stderr.isatty())
            try:
                scan = client.wait(
                    scan["id"], timeout=args.timeout, poll_interval=args.poll_interval, on_update=progress.update
                )
            finally:
                progress.done()
        except ClientError as exc:
            _fail(exc.code, exc.detail)
        except OSError as exc:  # a file that vanished or cannot be read between the argument check and the upload
            _fail("invalid_option", f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}")
    status = scan.get("status")
    if status == "failed":
        error = scan.get("error") or {}
        _fail(str(error.get("code") or "scan_failed"), f"scan {submission.url} failed: {error.get('detail', '')}")
    if status == "cancelled":
        _fail("scan_cancelled", f"scan {submission.url} was cancelled")
    result = scan.get("result")
    if not isinstance(result, dict):
        _fail("invalid_response", f"scan {submission.url} succeeded without a result")
    return _report(result, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backdoor-scan`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "worker"):
        return int(args.handler(args))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from scanner.errors import ScannerError

    try:
        code: int = args.handler(args)
    except ScannerError as exc:
        _fail(exc.code, exc.detail)
    except KeyboardInterrupt:
        print("backdoor-scan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI is a catch-all: one line for the user, the traceback only with -v
        logger.debug("unexpected error", exc_info=True)
        if args.verbose:
            logger.exception("unexpected error")
        _fail("internal_error", f"{type(exc).__name__}: {exc} (run with -v for the traceback)")
    return code


if __name__ == "__main__":
    sys.exit(main())
