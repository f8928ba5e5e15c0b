"""`loraplex generate` and `loraplex adapters ...`: loraplex.client calls against a running server."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..adapters.remote import is_remote
from ..errors import ConfigError
from ..settings import Layers, read_tokens

CLIENT = Layers("client", env_prefix="LORAPLEX_CLIENT_")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    add = lambda *flags, **kw: CLIENT.add(p, *flags, **kw)  # noqa: E731
    add("--server", default="127.0.0.1:50051", env="LORAPLEX_SERVER", help="host:port of the server")
    add("--token-file", metavar="FILE", help="bearer token to send (else env LORAPLEX_ADMIN_TOKEN for adapters "
        "commands, LORAPLEX_GENERATION_TOKEN for generate)")
    add("--tls-ca", metavar="PEM", help="CA to verify the server with (switches to TLS)")
    add("--tls-cert", metavar="PEM", help="client certificate for mTLS")
    add("--tls-key", metavar="PEM", help="client private key for mTLS")
    add("--tls-server-name", help="name to verify in the server certificate")
    add("--timeout", type=float, help="seconds per call (default: none)")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="one completion from a running server",
                       description="Send PROMPT (as a chat message unless --raw) and print the completion.")
    p.add_argument("prompt", metavar="PROMPT")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", default="", help="a registered adapter's name (default: the base model)")
    which.add_argument("--mix", type=parse_mix, metavar="A=W,B=W", help="weighted mix, e.g. caps=0.7,pirate=0.3")
    p.add_argument("--merge-method", default="LINEAR", choices=["LINEAR", "TIES", "DARE_LINEAR", "DARE_TIES"])
    p.add_argument("--density", type=float, help="TIES / DARE density in (0, 1]")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--raw", action="store_true", help="send PROMPT as raw text, not as a user chat message")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    _add_client_args(p)


def add_adapters_parser(sub) -> None:
    p = sub.add_parser("adapters", help="admin: list, register, upload, delete, pin adapters",
                       description="Admin calls to a running server's Adapters service.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listed = actions.add_parser("list", help="registered adapters")
    _add_client_args(listed)
    for action, help in (("get", "one adapter's details"), ("delete", "unregister (running requests finish)"),
                         ("pin", "keep in a device slot (persisted)"), ("unpin", "undo pin"),
                         ("load", "into host memory and a device slot"),
                         ("unload", "out of memory (stays registered)")):
        q = actions.add_parser(action, help=help)
        q.add_argument("name", metavar="NAME")
        _add_client_args(q)
    for action, help in (("register", "from PATH on the server's disk, inside its --adapter-root, or from "
                                      "hf://org/repo[@revision] or s3://bucket/prefix"),
                         ("upload", "send the PEFT folder PATH from this machine")):
        q = actions.add_parser(action, help=help)
        q.add_argument("name", metavar="NAME")
        q.add_argument("path", metavar="PATH")
        q.add_argument("--pin", action="store_true", help="pin it (persisted)")
        q.add_argument("--preload", action="store_true", help="copy it into a device slot now")
        _add_client_args(q)


def add_health_parser(sub) -> None:
    p = sub.add_parser("health", help="exit 0 when a server's gRPC health check says SERVING (probes, HEALTHCHECK)",
                       description="Ask a server's gRPC health service; exit status 0 when SERVING, 1 otherwise.")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    _add_client_args(p)


def run_health(args: argparse.Namespace) -> int:
    with _client(args, "LORAPLEX_GENERATION_TOKEN") as client:
        status = client.health(args.service, timeout=args.timeout or 5.0)
    print(status)
    return 0 if status == "SERVING" else 1


def parse_mix(text: str) -> list[tuple[str, float]]:
    parts = []
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not sep or not name or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=WEIGHT with a finite weight")
        parts.append((name, value))
    return parts


def _client(args, token_env: str):
    from loraplex.client import Client, ClientConfig

    tokens = read_tokens(args.token_file, token_env)
    return Client(ClientConfig(target=args.server, token=tokens[0] if tokens else None, tls_ca=args.tls_ca,
                               tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                               timeout=args.timeout))


def run_generate(args: argparse.Namespace) -> int:
    text = dict(prompt=args.prompt) if args.raw else dict(messages=[{"role": "user", "content": args.prompt}])
    options = dict(adapter=args.adapter, adapters=args.mix, merge_method=args.merge_method, density=args.density,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, stop=args.stop, **text)
    with _client(args, "LORAPLEX_GENERATION_TOKEN") as client:
        if not args.stream:
            print(client.generate(**options).text)
            return 0
        for chunk in client.stream(**options):
            print(chunk.text, end="", flush=True)
        print()
    return 0


WHERE = {"DEVICE": "device", "HOST": "host", "LOADING": "loading", "REGISTERED": "disk"}
"""Where an adapter lives now, by AdapterInfo.state: a device slot, host memory, or only its files on disk
(LOADING: on its way from disk to host memory)."""


def run_adapters(args: argparse.Namespace) -> int:
    with _client(args, "LORAPLEX_ADMIN_TOKEN") as client:
        if args.action == "list":
            print(f"{'NAME':24} {'VER':>4} {'STATE':10} {'WHERE':7} {'PIN':3} {'RANK':>4} {'REQUESTS':>8}  SOURCE")
            for info in client.list_adapters():
                print(f"{info.name:24} {info.version:>4} {info.state:10} {WHERE.get(info.state, '?'):7} "
                      f"{'yes' if info.pinned else '':3} {info.rank:>4} {info.request_count:>8}  {info.source}")
            return 0
        if args.action == "register":
            info = client.register_adapter(args.name, _server_path(args.path), pin=args.pin, preload=args.preload)
        elif args.action == "upload":
            if not Path(args.path).is_dir():
                raise ConfigError(f"{args.path}: not a folder (expected a PEFT adapter folder)")
            info = client.upload_adapter(args.name, args.path, pin=args.pin, preload=args.preload)
        else:
            info = getattr(client, f"{args.action}_adapter")(args.name)
    verb = {"get": "", "delete": "deleted ", "register": "registered ", "upload": "uploaded ", "pin": "pinned ",
            "unpin": "unpinned ", "load": "loaded ", "unload": "unloaded "}[args.action]
    print(f"{verb}{info.name} version {info.version}: rank {info.rank}, {info.state}"
          f"{', pinned' if info.pinned else ''}, {info.size_bytes} bytes, sha256 {info.sha256[:12]}, "
          f"source {info.source}", file=sys.stdout)
    return 0


def _server_path(path: str) -> str:
    """A relative PATH that exists here is sent absolute (same machine); otherwise, and hf:// or s3:// URLs, as
    given (relative to a root)."""
    local = not is_remote(path) and not os.path.isabs(path) and os.path.exists(path)
    return os.path.abspath(path) if local else path
