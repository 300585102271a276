"""structlog, configured once per process: JSON lines off a TTY, console on a TTY.

Per-message context (task id, source, model, segment) is bound with contextvars, e.g.::

    with bound(task_id=t, source=s):
        log.info("exit_taken", exit=2)
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars as bound

from offramp.errors import SettingsError

__all__ = ["bound", "configure_logging", "get_logger"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process; call once from an entry point."""
    if level.lower() not in LEVELS:
        raise SettingsError(f"OFFRAMP_LOG_LEVEL={level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in ("auto", "json", "console"):
        raise SettingsError(f"OFFRAMP_LOG_FORMAT={fmt!r}: expected auto, json or console")
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer() if use_console
                     else structlog.processors.JSONRenderer())
    stamp: list[Any] = [structlog.processors.add_log_level,
             structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            structlog.processors.StackInfoRenderer(),
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level.lower()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The standard library's records and Python warnings (from libraries) in the same format,
    # so a JSON log stays one JSON object per line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def get_logger(name: str, **context: Any) -> Any:
    return structlog.get_logger(name).bind(**context)
