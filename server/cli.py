"""The `softdimo` command as the service runs it: the library's commands (softdimo.cli) plus `serve`."""

from __future__ import annotations

import argparse
import sys
from typing import Literal, get_args, get_origin

from softdimo import cli

ENVIRONMENT_ONLY = ("api_key", "webhook_secret")


def _serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from server.app import serve
    from server.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"softdimo serve: invalid settings: {problems}") from None
    serve(settings)


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, named after it; defaults stay in Settings (a flag left out is not passed)."""
    from server.settings import Settings, shown_default

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help = f"{field.description or ''} (default: {shown_default(name)})".lstrip()
        if name in ENVIRONMENT_ONLY:
            continue  # secrets stay out of `ps` and shell history
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif name in ("weights", "auth_exempt_paths"):
            parser.add_argument(flag, nargs="*" if name == "auth_exempt_paths" else "+", help=help)
        elif get_origin(field.annotation) is Literal:
            parser.add_argument(flag, choices=get_args(field.annotation), help=help)
        else:
            kind = field.annotation if field.annotation in (int, float) else str
            parser.add_argument(flag, type=kind, help=help)


def register(commands, add_bench_suite: cli.SuiteAdder) -> None:
    """Add `serve` to the `softdimo` parser (the service adds no benchmark suite; benchmarks.cli adds those)."""
    srv = commands.add_parser("serve", help="run the HTTP server (flags override SOFTDIMO_* environment settings)")
    _serve_flags(srv)
    srv.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extend=register)


if __name__ == "__main__":
    sys.exit(main())
