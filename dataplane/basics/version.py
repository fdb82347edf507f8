"""The software's version: ``VERSION`` (the package's, for heartbeats, metrics and user agents)
and ``SOFTWARE`` (``ferryman/<version>`` as nodes announce it in HELLO and HTTP requests)."""

from __future__ import annotations

import tomllib
from pathlib import Path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ferryman")
    except PackageNotFoundError:  # running from a source checkout
        try:
            with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as fh:
                return str(tomllib.load(fh)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


VERSION = _version()
SOFTWARE = "ferryman/0.1.0"  # what a node announces in HELLO and sends as its HTTP user agent
