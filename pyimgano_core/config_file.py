"""Reading a config file: the checks that need no schema (found, a file, UTF-8, YAML).

Kept free of heavy imports (no numpy, OpenCV, torch, the detectors) so that a missing file or
bad YAML is answered at once: the CLI calls :func:`read_config_file` before it imports the
schema in :mod:`.config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file (``{}`` when empty), or a one-line :class:`ConfigError`."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the YAML config file inside it (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read config {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
