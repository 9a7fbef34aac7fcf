"""Which globals a pickle would import, read without unpickling it, and the allowlist they are held to.

Nothing here unpickles or imports a name from a file. :func:`walk_pickle` steps through one pickle
opcode by opcode (``pickletools.genops``) while a small model of the unpickler's stack and memo
resolves the operands of ``STACK_GLOBAL``, so an import is seen whether it is spelled out or assembled
from strings. The imports are judged against torch's own weights-only allowlist (an allowlist, not a
denylist: anything not known to be harmless is reported), read from the installed torch itself.
:class:`PickleScan` turns the walks of one member into findings, reading a legacy ``torch.save``
stream as the five pickles it holds back to back.

TorchScript archives name their compiled classes ``__torch__.*`` and their list builders
``torch.jit._pickle.*``; the TorchScript loader resolves those itself without importing Python, so
:data:`TORCHSCRIPT_BUILTINS` are added to the allowlist for TorchScript archives only (loading
TorchScript at all needs the operator's trust switch).
"""

from __future__ import annotations

import _compat_pickle
import functools
import pickletools
import warnings
from dataclasses import dataclass, field
from typing import IO, Any, cast

from scanner.errors import AllowlistUnavailableError
from scanner.loading.types import LEGACY_MAGIC_NUMBER, FindingKind, PickleFinding, ScanLimits

__all__ = [
    "TORCHSCRIPT_BUILTINS",
    "PickleImport",
    "PickleScan",
    "PickleWalk",
    "allowed_globals",
    "walk_pickle",
]

#: Globals that TorchScript archives' pickles name and the TorchScript loader resolves without Python.
TORCHSCRIPT_BUILTINS = frozenset(
    f"torch.jit._pickle.{name}"
    for name in (
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    )
)
_LEGACY_PICKLE_NAMES = ("magic number", "protocol version", "sys_info", "object", "storage keys")
_WHOLE_MODULE_PREFIXES = ("torch.nn.modules.", "__main__.", "torchvision.models.")


@functools.cache
def allowed_globals() -> frozenset[str]:
    """The ``module.name`` strings that torch's weights-only unpickler accepts by default.

    Read from the installed torch so the allowlist follows torch upgrades. Deliberately NOT
    ``torch.serialization.get_safe_globals()``: that list can be extended by any code running
    in the process, and a scanner must not trust its environment.

    Raises:
        AllowlistUnavailableError: torch no longer has the private function (fail closed).
    """
    try:
        # Private torch API: the default allowlist of torch.load(weights_only=True). There is no
        # public equivalent; if it moves, every scan fails loudly rather than passing silently.
        from torch._weights_only_unpickler import _get_allowed_globals

        names = frozenset(str(name) for name in _get_allowed_globals())
    except (ImportError, AttributeError, TypeError) as exc:
        raise AllowlistUnavailableError(
            f"cannot read torch's weights-only allowlist (torch._weights_only_unpickler._get_allowed_globals): {exc}"
        ) from exc
    if not names:
        raise AllowlistUnavailableError("torch's weights-only allowlist is empty")
    return names


class _PickleTooLarge(Exception):
    """The walk went past a limit; the pickle is not walked further."""


class _CappedReader:
    """File-like view that refuses to hand out more than ``cap`` bytes (genops reads through it)."""

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        self._stream = stream
        self._left = cap

    def _take(self, data: bytes) -> bytes:
        if len(data) > self._left:
            raise _PickleTooLarge
        self._left -= len(data)
        return data

    def tell(self) -> int:
        return self._stream.tell()

    def read(self, size: int = -1) -> bytes:
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(wanted))

    def readline(self, size: int = -1) -> bytes:
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(wanted))


@dataclass(frozen=True)
class PickleImport:
    """One global a pickle would import, as ``module.name``."""

    name: str
    importable: bool  # a dotted identifier path that CPython could import; lenient walks report only these


@dataclass
class PickleWalk:
    """What :func:`walk_pickle` saw: the imports, the integer operands (record counts, the legacy magic number),
    and why the walk stopped early, if it did."""

    imports: list[PickleImport] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    error: str | None = None
    too_large: bool = False

    @property
    def complete(self) -> bool:
        return self.error is None


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_MARK = _Sentinel("MARK")  # the MARK object on the simulated stack
_VALUE = _Sentinel("VALUE")  # any value on the simulated stack that is not a string
_STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_INT_OPCODES = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})


def _global_name(module: str, name: str, protocol: int) -> PickleImport:
    """``module.name`` as CPython's ``find_class`` would resolve it (including Python 2 names)."""
    if protocol < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    importable = all(part.isidentifier() for part in f"{module}.{name}".split("."))
    return PickleImport(f"{module}.{name}", importable)


def walk_pickle(stream: IO[bytes], limits: ScanLimits) -> PickleWalk:
    """Walk one pickle from the stream's position to its STOP opcode, collecting imports.

    The stack model follows CPython's unpickler (opcodes never pop across a MARK, POP with
    nothing above the MARK drops the MARK, memo entries may be overwritten) and tracks only
    which entries are strings, so ``STACK_GLOBAL`` operands resolve like they would at load.
    """
    walk = PickleWalk()
    stack: list[object] = []  # _MARK entries separate the frames
    memo: dict[int, object] = {}
    protocol = 0

    def pop() -> object:
        if not stack or stack[-1] is _MARK:
            raise ValueError("stack underflow")
        return stack.pop()

    def pop_mark() -> None:
        if _MARK not in stack:
            raise ValueError("no MARK on the stack")
        del stack[len(stack) - 1 - stack[::-1].index(_MARK) :]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # genops on escapes like b"\\?" in raw bytes
        try:
            reader = cast(IO[bytes], _CappedReader(stream, limits.max_pickle_bytes))
            for opcode, raw_arg, position in pickletools.genops(reader):
                arg: Any = raw_arg
                name = opcode.name
                if name == "PROTO":
                    protocol = int(arg)
                elif name in ("GLOBAL", "INST"):
                    module, _, attribute = str(arg).partition(" ")
                    walk.imports.append(_global_name(module, attribute, protocol))
                elif name in _INT_OPCODES and type(arg) is int:
                    walk.ints.append(arg)

                if name in _STRING_OPCODES and isinstance(arg, str):
                    stack.append(arg)
                elif name == "STACK_GLOBAL":
                    top, below = pop(), pop()
                    if isinstance(below, str) and isinstance(top, str):
                        walk.imports.append(_global_name(below, top, protocol))
                    else:
                        walk.imports.append(PickleImport(f"<unresolvable STACK_GLOBAL at byte {position}>", False))
                    stack.append(_VALUE)
                elif name in _EXT_OPCODES:
                    # copyreg's extension registry maps codes to globals; nothing registers any, but
                    # a code is an import all the same.
                    walk.imports.append(PickleImport(f"<copyreg extension code {arg}>", False))
                    stack.append(_VALUE)
                elif name in _PUT_OPCODES or name == "MEMOIZE":
                    if not stack or stack[-1] is _MARK:
                        raise ValueError("memo store without a value on the stack")
                    memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
                elif name in _GET_OPCODES:
                    if int(arg) not in memo:
                        raise ValueError(f"memo key {arg} read before it was stored")
                    stack.append(memo[int(arg)])
                elif name == "DUP":
                    stack.append(stack[-1] if stack else pop())
                elif name == "MARK":
                    stack.append(_MARK)
                elif name == "POP":
                    if stack and stack[-1] is _MARK:
                        stack.pop()
                    else:
                        pop()
                else:
                    before = opcode.stack_before
                    if pickletools.markobject in before:
                        pop_mark()
                        for _ in range(before.index(pickletools.markobject)):
                            pop()
                    else:
                        for _ in before:
                            pop()
                    stack.extend(_VALUE for _ in opcode.stack_after)
                if len(stack) > limits.max_pickle_stack or len(memo) > limits.max_pickle_stack:
                    raise _PickleTooLarge
        except _PickleTooLarge:
            walk.too_large = True
            walk.error = (
                f"larger than the scan limits ({limits.max_pickle_bytes} bytes, {limits.max_pickle_stack} entries)"
            )
        except Exception as exc:  # genops raises ValueError, EOFError, UnicodeDecodeError, ... on garbage
            walk.error = f"{type(exc).__name__}: {exc}"
    return walk


def _whole_module_hint(names: list[str]) -> str:
    if any(name.startswith(_WHOLE_MODULE_PREFIXES) for name in names):
        return (
            " These look like a whole pickled nn.Module (torch.save(model)), which is a program, not weights:"
            " save model.state_dict() with safetensors.torch.save_file(...), or export the model with"
            " torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2')."
        )
    return ""


@dataclass
class PickleScan:
    """The findings about one file's pickles: imports outside ``allowed``, pickles that cannot be read.

    :mod:`scanner.loading.archive_check` extends it with the walk of the containers around the pickles.
    """

    allowed: frozenset[str]
    allow_torchscript_classes: bool
    limits: ScanLimits
    pickles: int = 0
    findings: list[PickleFinding] = field(default_factory=list)

    def flag(self, member: str, kind: FindingKind, message: str, names: tuple[str, ...] = ()) -> None:
        self.findings.append(PickleFinding(member=member, globals=names, message=message, kind=kind))

    def is_allowed(self, name: str) -> bool:
        return name in self.allowed or (self.allow_torchscript_classes and name.startswith("__torch__."))

    def pickle_stream(self, stream: IO[bytes], member: str, *, strict: bool) -> None:
        """Walk the pickle(s) at the stream's position as ``torch.load`` would read them.

        The first pickle always; when it is the legacy magic number, the four that follow it.
        Strict walks report parse failures; lenient walks only report importable names.
        """
        walks = [walk_pickle(stream, self.limits)]
        if walks[0].complete and LEGACY_MAGIC_NUMBER in walks[0].ints:
            strict = True
            while len(walks) < len(_LEGACY_PICKLE_NAMES) and walks[-1].complete:
                walks.append(walk_pickle(stream, self.limits))
        self.report_walks(member, walks, strict=strict, labels=_LEGACY_PICKLE_NAMES if len(walks) > 1 else None)

    def report_walks(
        self, member: str, walks: list[PickleWalk], *, strict: bool, labels: tuple[str, ...] | None = None
    ) -> None:
        """Turn walks of one member into at most a few findings (imports, parse errors, limits)."""
        unsafe: list[str] = []
        for walk in walks:
            self.pickles += strict
            for imported in walk.imports:
                if (
                    (strict or imported.importable)
                    and not self.is_allowed(imported.name)
                    and imported.name not in unsafe
                ):
                    unsafe.append(imported.name)
        if unsafe:
            self.flag(
                member,
                FindingKind.unsafe_global,
                f"pickle imports {', '.join(unsafe)}, outside torch's weights-only allowlist;"
                " unpickling it could run arbitrary code." + _whole_module_hint(unsafe),
                tuple(unsafe),
            )
        for index, walk in enumerate(walks):
            if walk.error is None or not strict:  # lenient: raw bytes fail to parse all the time
                continue
            where = f" ({labels[index]} pickle)" if labels else ""
            if walk.too_large:
                self.flag(member, FindingKind.limit_exceeded, f"pickle{where} is {walk.error}; it was not checked")
            else:
                self.flag(
                    member,
                    FindingKind.malformed_pickle,
                    f"pickle{where} cannot be parsed (truncated or corrupt): {walk.error}",
                )
