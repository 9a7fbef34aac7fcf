"""The ``backdoor-scan`` command line.

Exit codes (the convention model scanners in pipelines use): 0 clean (or inconclusive), 1 findings
(``backdoored`` or ``unsafe_file``), 2 error (bad input or options; one line on stderr with the error code).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
    scan.add_argument("model", type=_existing_file, help="checkpoint: .pt2, safetensors, torch.save state_dict")
    scan.add_argument("--arch", help="architecture for state_dicts (mnist_cnn, cifar_cnn, resnet18, ...)")
    scan.add_argument("--num-classes", type=int, help="class count for --arch (default: read from the weights)")
    scan.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="shape of one input image")
    scan.add_argument("--data", type=_existing_file, metavar="FILE", help="clean samples (.npz or ImageFolder .zip)")
    scan.add_argument("--training-data", type=_existing_file, metavar="FILE", help="training set to inspect")
    scan.add_argument("--mean", type=_floats, metavar="M1,M2,..", help="per-channel normalisation mean")
    scan.add_argument("--std", type=_floats, metavar="S1,S2,..", help="per-channel normalisation std")
    scan.add_argument("--trust-code", action="store_true", help="allow TorchScript, which runs code when loaded")
    scan.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    scan.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    scan.add_argument("--format", choices=("json", "text"), default="text", help="report format (default: text)")
    scan.add_argument("--artifacts", type=Path, metavar="DIR", help="write verdict.json and detector artifacts here")
    scan.set_defaults(handler=_cmd_scan)
    return parser


def _cmd_scan(args: argparse.Namespace) -> int:
    from scanner import ModelOptions, ScanConfig, resolve_device, scan
    from scanner.report import render_text, write_artifacts

    options = ModelOptions(
        arch=args.arch,
        num_classes=args.num_classes,
        input_shape=args.input_shape,
        mean=args.mean,
        std=args.std,
        trust_code=args.trust_code,
    )
    config = ScanConfig(model=options, seed=args.seed)
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
    if args.format == "json":
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        print(render_text(verdict, args.model.name))
    return EXIT_FINDINGS if verdict.has_findings else EXIT_CLEAN


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backdoor-scan`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
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
