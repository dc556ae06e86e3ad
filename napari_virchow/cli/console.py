"""CLI console: results on stdout, one-line warnings and errors on stderr, around tqdm bars.

While a command runs, the package's log records and Python warnings become one line each
(``napari-virchow: warning: ...``), deduplicated, and never tear a progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from napari_virchow.errors import VirchowError

__all__ = ["CONSOLE", "PROG", "Console", "is_dependency_pydantic_deprecation", "one_line"]

PROG = "napari-virchow"
log = logging.getLogger("napari_virchow.cli.app")


#: packages whose pydantic v1-style models emit PydanticDeprecatedSince20 at import (napari and npe2
#: record these and replay them through ``warnings.showwarning``); pydantic itself is named because
#: some of those warnings are attributed to pydantic's own schema code. This package uses no pydantic.
_PYDANTIC_V1_USERS = ("napari", "npe2", "pydantic")


@functools.cache
def _package_dirs() -> tuple[Path, ...]:
    dirs = []
    for name in _PYDANTIC_V1_USERS:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # not installed, or a stub module without a spec
            continue
        if spec is not None:
            dirs += [Path(d).resolve() for d in spec.submodule_search_locations or []]
    return tuple(dirs)


def is_dependency_pydantic_deprecation(category: type[Warning], filename: str) -> bool:
    """Whether a warning is napari's or npe2's ``PydanticDeprecatedSince20`` (noise the user cannot act on)."""
    base = getattr(sys.modules.get("pydantic.warnings"), "PydanticDeprecatedSince20", None)
    if base is None or not (isinstance(category, type) and issubclass(category, base)):
        return False
    try:
        where = Path(filename).resolve()
    except (OSError, TypeError, ValueError):  # "<string>" and the like: not from a package file
        return False
    return any(where.is_relative_to(d) for d in _package_dirs())


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class Console:
    """stdout results and one-line stderr warnings/errors, written around tqdm bars."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def out(self, line: str) -> None:
        """A result line on stdout (above any progress bar)."""
        tqdm.write(line, file=sys.stdout)

    def warn(self, text: object) -> None:
        """A one-line warning on stderr, each distinct text once."""
        line = one_line(text)
        if line not in self._seen:  # the core both logs and warns some things (random weights)
            self._seen.add(line)
            tqdm.write(f"{PROG}: warning: {line}", file=sys.stderr)

    def error(self, text: object) -> None:
        """A one-line error on stderr."""
        tqdm.write(f"{PROG}: error: {one_line(text)}", file=sys.stderr)

    def slide_failed(self, slide: str | os.PathLike[str], exc: BaseException | str) -> None:
        """One line naming the slide; tracebacks of unexpected errors only with ``-v``."""
        name = Path(slide).name
        if isinstance(exc, BaseException):
            message = str(exc) if isinstance(exc, VirchowError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, VirchowError):
                log.debug("%s failed", name, exc_info=exc)
        else:
            message = exc
        self.error(message if name in message else f"{name}: {message}")

    def showwarning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: object = None, line: str | None = None) -> None:  # fmt: skip
        """``warnings.showwarning`` while a command runs: one line each, napari's and npe2's pydantic
        deprecation warnings dropped."""
        if not is_dependency_pydantic_deprecation(category, filename):
            self.warn(message)

    @contextlib.contextmanager
    def session(self, *, verbose: bool) -> Iterator[None]:
        """Route the package's log records and Python warnings to one-line messages."""
        self._seen.clear()
        logger = logging.getLogger("napari_virchow")
        handler = _ConsoleHandler(self)
        before = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.propagate = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = self.showwarning
                yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(before[0])
            logger.propagate = before[1]


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.console.warn(record.getMessage())
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        tqdm.write(f"{PROG}: {record.levelname.lower()}: {text}", file=sys.stderr)


CONSOLE = Console()
