"""Log setup of every Ferryman process: the root logger to stderr as ``text`` or ``json`` lines,
with the process's role and name and every ``extra={...}`` field of a record."""

from __future__ import annotations

import datetime as _dt
import logging
import sys
from typing import Any

import msgspec

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class _Formatter(logging.Formatter):
    """Base for both formats: timestamp, role/node, and the ``extra`` fields of a record."""

    def __init__(self, role: str, node: str) -> None:
        super().__init__()
        self.role, self.node = role, node

    @staticmethod
    def timestamp(record: logging.LogRecord) -> str:
        t = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"

    @staticmethod
    def extras(record: logging.LogRecord) -> dict[str, Any]:
        return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}

    def trace(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class JsonFormatter(_Formatter):
    """One JSON object per line: ts, level, role, node, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": self.timestamp(record), "level": record.levelname, "role": self.role,
                                "node": self.node, "logger": record.name, "msg": record.getMessage()}
        for key, value in self.extras(record).items():
            data[key if key not in data else key + "_"] = _jsonable(value)
        trace = self.trace(record)
        if trace:
            data["exc"] = trace
        return msgspec.json.encode(data).decode()


class TextFormatter(_Formatter):
    """``TS LEVEL role[node] msg key=value ...`` with the traceback on the following lines."""

    @staticmethod
    def quote(value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        if text == "" or any(c.isspace() or c in '"=' for c in text):
            return msgspec.json.encode(text).decode()
        return text

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.timestamp(record)} {record.levelname} {self.role}[{self.node}] {record.getMessage()}"
        fields = "".join(f" {k}={self.quote(v)}" for k, v in self.extras(record).items())
        trace = self.trace(record)
        return line + fields + ("\n" + trace if trace else "")


def setup_logging(level: str, fmt: str, role: str, node: str) -> None:
    """Send the root logger to stderr in ``fmt`` ("text" or "json"); safe to call again."""
    lvl = _LEVELS.get(level.strip().lower())
    if lvl is None:
        raise ValueError(f"FERRYMAN_LOG_LEVEL={level!r}: must be debug, info, warning or error")
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(role, node)
    elif fmt == "text":
        formatter = TextFormatter(role, node)
    else:
        raise ValueError(f"FERRYMAN_LOG_FORMAT={fmt!r}: must be 'text' or 'json'")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(lvl)
