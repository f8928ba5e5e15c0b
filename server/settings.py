"""Layered CLI settings: built-in default < config file (TOML) < environment < command-line flag.

A layered option is declared once with `Layers.add`, which registers the flag with no argparse
default; after parsing, `resolve` fills every option the command line left unset from, in order,
the environment (`LORAPLEX_<NAME>`, or the name given), the command's table of the config file
(`--config FILE` or `LORAPLEX_CONFIG`; `[serve]`, `[client]`; keys spelled like the flags, with `-`
or `_`), then the default. Every problem is a ConfigError of one line.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class _Option:
    dest: str
    default: Any
    convert: Callable[[str], Any]
    env: str
    kind: str
    """value, flag (store_true) or list (repeatable)."""
    sep: str | None = os.pathsep
    """What separates a list's items in the environment (None: whitespace)."""


class Layers:
    def __init__(self, section: str, env_prefix: str = "LORAPLEX_"):
        self.section, self.env_prefix = section, env_prefix
        self.options: dict[str, _Option] = {}

    def add(self, parser: argparse.ArgumentParser, *flags: str, default=None, type=str, env: str | None = None,
            action: str | None = None, help: str = "", sep: str | None = os.pathsep, **kwargs) -> None:
        kind = {"store_true": "flag", "append": "list"}.get(action or "", "value")
        dest = kwargs.pop("dest", None) or flags[0].lstrip("-").replace("-", "_")
        env = env or self.env_prefix + dest.upper()
        shown = "" if default in (None, (), False) else f"default: {default}; "
        help = f"{help} ({shown}env {env})" if help != argparse.SUPPRESS else help
        if kind == "flag":
            parser.add_argument(*flags, dest=dest, action="store_true", default=None, help=help, **kwargs)
        else:
            parser.add_argument(*flags, dest=dest, action=action, type=type, default=None, help=help, **kwargs)
        self.options[dest] = _Option(dest, default, type, env, kind, sep)
        parser.set_defaults(_layers=self)

    def resolve(self, args: argparse.Namespace, config: dict, environ=os.environ) -> None:
        table = {key.replace("-", "_"): value for key, value in config.get(self.section, {}).items()}
        unknown = sorted(set(table) - set(self.options))
        if unknown:
            raise ConfigError(f"config file [{self.section}]: unknown keys {', '.join(unknown)}")
        for option in self.options.values():
            if getattr(args, option.dest) is not None:
                continue
            if option.env in environ and environ[option.env] != "":
                value = self._from_env(option, environ[option.env])
            elif option.dest in table:
                value = self._from_file(option, table[option.dest])
            else:
                value = option.default
            setattr(args, option.dest, value)

    def _from_env(self, option: _Option, raw: str):
        if option.kind == "flag":
            if raw.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{option.env}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)}")
            return raw.lower() in _TRUE
        if option.kind == "list":
            return [self._convert(option, part, option.env) for part in raw.split(option.sep) if part]
        return self._convert(option, raw, option.env)

    def _from_file(self, option: _Option, value):
        where = f"config file [{self.section}] {option.dest}"
        if option.kind == "flag":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            return value
        if option.kind == "list":
            values = value if isinstance(value, list) else [value]
            return [self._convert(option, str(v), where) for v in values]
        return self._convert(option, str(value), where)

    @staticmethod
    def _convert(option: _Option, raw: str, where: str):
        try:
            return option.convert(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{where}: {raw!r} is not a valid value") from None


def read_config_file(path: str | None) -> dict:
    """The TOML config file's tables ({} when no file is named)."""
    if not path:
        return {}
    try:
        with open(Path(path).expanduser(), "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None


def read_tokens(path: str | None, env_name: str, environ=os.environ) -> tuple[str, ...]:
    """Bearer tokens from a file (one per line; blank lines and # comments ignored) or one from the env."""
    if path:
        try:
            lines = Path(path).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"token file {path}: {exc.strerror}") from None
        tokens = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
        if not tokens:
            raise ConfigError(f"token file {path}: holds no token")
        return tokens
    token = environ.get(env_name, "").strip()
    return (token,) if token else ()
