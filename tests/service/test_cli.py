"""The command line: layered settings, every --help, client commands against a real server, and user
errors as one line without a traceback."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from loraplex.server.cli import build_parser, main
from loraplex.server.config import ServiceConfig
from loraplex.server.errors import ConfigError
from loraplex.server.service.serve_cmd import configs_from_args
from loraplex.server.settings import read_config_file, read_tokens

from .conftest import ServerThread, engine_config_for_tests, free_port


def parse(argv, config=None, environ=None):
    args = build_parser().parse_args(argv)
    args._layers.resolve(args, config or {}, environ or {})
    return args


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    config = {"serve": {"port": 1111, "state-dir": "/from/file", "no_metrics": True, "adapter-root": ["/a", "/b"]}}
    args = parse(["serve"], config, {"LORAPLEX_PORT": "2222"})
    assert (args.port, args.state_dir, args.no_metrics, args.adapter_root) == (2222, "/from/file", True, ["/a", "/b"])
    assert (args.host, args.metrics_port, args.quantization) == ("127.0.0.1", 9400, "nf4")  # defaults
    args = parse(["serve", "--port", "3333", "--adapter-root", "/c"], config,
                 {"LORAPLEX_PORT": "2222", "LORAPLEX_ADAPTER_ROOTS": os.pathsep.join(["/x", "/y"])})
    assert (args.port, args.adapter_root) == (3333, ["/c"])
    args = parse(["serve"], config,
                 {"LORAPLEX_ADAPTER_ROOTS": os.pathsep.join(["/x", "/y"]), "LORAPLEX_NO_METRICS": "0"})
    assert (args.adapter_root, args.no_metrics) == (["/x", "/y"], False)
    client = parse(["adapters", "list"], {"client": {"server": "h:1", "timeout": 3}}, {"LORAPLEX_SERVER": "e:2"})
    assert (client.server, client.timeout) == ("e:2", 3.0)
    path = tmp_path / "loraplex.toml"
    path.write_text('[serve]\nport = 4444\n[client]\nserver = "h:9"\n')
    assert read_config_file(str(path)) == {"serve": {"port": 4444}, "client": {"server": "h:9"}}


@pytest.mark.parametrize("config, environ, words", [
    ({"serve": {"prot": 1}}, {}, "unknown keys prot"),
    ({"serve": {"port": "many"}}, {}, "port"),
    ({"serve": {"no_metrics": "yes"}}, {}, "true or false"),
    ({}, {"LORAPLEX_PORT": "x"}, "LORAPLEX_PORT"),
    ({}, {"LORAPLEX_NO_METRICS": "maybe"}, "LORAPLEX_NO_METRICS"),
])
def test_bad_settings_are_one_clear_error(config, environ, words):
    with pytest.raises(ConfigError, match=words):
        parse(["serve"], config, environ)


def test_serve_settings_build_the_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_GENERATION_TOKEN", "gen")
    tokens = tmp_path / "admin.tokens"
    tokens.write_text("# rotate: new first\nnew-token\n\nold-token\n")
    args = parse(["serve", "--admin-token-file", str(tokens), "--max-loras", "2", "--no-metrics",
                  "--adapter-root", str(tmp_path), "--quantization", "none", "--http-port", "0"])
    service, engine = configs_from_args(args)
    assert service.http_port == 0 and configs_from_args(parse(["serve"]))[0].http_port is None
    assert service.admin_tokens == ("new-token", "old-token") and service.generation_tokens == ("gen",)
    assert service.metrics_port is None and service.adapter_roots == (str(tmp_path.resolve()),)
    assert engine.lora.max_loras == 2 and engine.lora.max_adapters_per_request == 2
    assert "new-token" not in repr(service)
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        read_tokens(str(empty), "UNSET")
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        ServiceConfig(tls_cert="x.pem")


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


def test_help_everywhere(capsys):
    commands = list(_subcommands(build_parser()))
    assert {("serve",), ("generate",), ("adapters", "upload"), ("adapters", "pin"), ("demo",)} <= set(commands)
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: loraplex" in capsys.readouterr().out


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    running = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"),
                                         adapter_roots=(str(adapter_root),), admin_tokens=("cli-admin",)),
                           engine_config_for_tests(base / "cache"), smol_fp32)
    yield running
    running.stop()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_client_commands_against_a_server(server, adapter_root, capsys, monkeypatch, tmp_path):
    target = ["--server", server.target]
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "cli-admin")
    code, out, _ = run_cli(capsys, "adapters", "register", "caps", str(adapter_root / "caps"), "--pin", *target)
    assert code == 0 and out.startswith("registered caps version 1") and "pinned" in out and "DEVICE" in out
    code, out, _ = run_cli(capsys, "adapters", "upload", "pirate", str(adapter_root / "pirate"), *target)
    assert code == 0 and out.startswith("uploaded pirate version 1") and "source upload" in out
    code, out, _ = run_cli(capsys, "adapters", "list", *target)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "VER", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ["caps", "pirate"]
    code, out, _ = run_cli(capsys, "generate", "--adapter", "caps", "--max-new-tokens", "8", "Name a color.", *target)
    assert code == 0 and out.strip() and out.upper() == out
    code, out, _ = run_cli(capsys, "generate", "--mix", "caps=0.5,pirate=0.5", "--stream", "--max-new-tokens", "8",
                           "Name a color.", *target)
    assert code == 0 and out.strip()
    code, _, err = run_cli(capsys, "adapters", "get", "nope", *target)
    assert code == 1 and err.strip() == "loraplex: error: NOT_FOUND: adapter 'nope' is not registered"
    token = tmp_path / "wrong.token"
    token.write_text("wrong\n")
    code, _, err = run_cli(capsys, "adapters", "delete", "caps", "--token-file", str(token), *target)
    assert code == 1 and err.startswith("loraplex: error: PERMISSION_DENIED") and len(err.splitlines()) == 1
    code, out, _ = run_cli(capsys, "adapters", "pin", "pirate", *target)
    assert code == 0 and "pinned" in out
    code, out, _ = run_cli(capsys, "adapters", "delete", "caps", *target)
    assert code == 0 and out.startswith("deleted caps version 1")
    code, _, err = run_cli(capsys, "adapters", "upload", "x", str(tmp_path), *target)
    assert code == 2 and "missing adapter_config.json" in err and len(err.splitlines()) == 1


def test_adapters_list_shows_where_each_adapter_lives(server, adapter_root, capsys, monkeypatch):
    """WHERE: host memory after registration, a device slot after `load`, only the registered files on disk
    after `unload`; the column follows AdapterInfo.state."""
    target = ["--server", server.target]
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "cli-admin")

    def where(name: str) -> tuple[str, str]:
        code, out, _ = run_cli(capsys, "adapters", "list", *target)
        assert code == 0 and out.splitlines()[0].split()[:4] == ["NAME", "VER", "STATE", "WHERE"]
        [row] = [line.split() for line in out.splitlines()[1:] if line.split()[0] == name]
        return row[2], row[3]

    assert run_cli(capsys, "adapters", "register", "tiers", str(adapter_root / "pirate_soft"), *target)[0] == 0
    assert where("tiers") == ("HOST", "host")  # validated and prepared at registration
    assert run_cli(capsys, "adapters", "load", "tiers", *target)[0] == 0
    assert where("tiers") == ("DEVICE", "device")
    assert run_cli(capsys, "adapters", "unload", "tiers", *target)[0] == 0
    assert where("tiers") == ("REGISTERED", "disk")
    assert run_cli(capsys, "adapters", "delete", "tiers", *target)[0] == 0


@pytest.mark.parametrize("argv, code, words", [
    (["adapters", "list", "--server", "127.0.0.1:{port}", "--timeout", "5"], 1, "UNAVAILABLE"),
    (["serve", "--tls-cert", "server.pem", "--no-metrics", "--quantization", "none"], 2, "tls_cert and tls_key"),
    (["serve", "--admin-token-file", "/no/such/file"], 2, "token file /no/such/file"),
    (["--config", "/no/such.toml", "serve"], 2, "config file /no/such.toml"),
    (["generate", "--mix", "caps=x", "hi"], 2, "NAME=WEIGHT"),
])
def test_user_errors_print_one_line_without_traceback(argv, code, words):
    argv = [a.replace("{port}", str(free_port())) for a in argv]
    result = subprocess.run([sys.executable, "-m", "loraplex.server.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("loraplex") or "error" in line]
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and words in errors[0], result.stderr
