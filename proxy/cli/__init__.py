"""The ``sidecar`` command: run, validate, explain, schema, echo, plugins."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def check(config: str | None, warnings: list[str] | None = None, *, offline: bool = True) -> list[str]:
    """Every problem in config.toml and policies/, as ``file: field: reason`` lines.

    ``warnings`` collects what does not stop a start (a secret reference that
    does not resolve now: the sidecar starts and that route answers 503).
    Unless ``offline``, references to remote sources that can be probed
    (``aws-sm:``) are read once each.
    """
    from .validate import collect

    problems, found = collect(config, offline=offline)
    if warnings is not None:
        warnings.extend(found)
    return problems


def cmd_run(args: argparse.Namespace) -> int:
    from ..server import run

    problems = check(args.config)
    if problems:
        print("sidecar: refusing to start; fix these:", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 2
    return run(args.config)


def cmd_validate(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    problems = check(args.config, warnings, offline=args.offline)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        files = {p.split(": ", 1)[0] for p in problems}
        print(f"{len(problems)} problem(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print("ok: config and policies are valid")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..config import load_settings
    from ..plugins import collect_specs, make_plugin_manager, ordered

    extra = load_settings(args.config).sidecar.plugins if args.config else []
    specs = collect_specs(make_plugin_manager(extra))
    print(f"{'plugin':<20} {'priority':>8}  {'scope':<9} origin")
    for spec in ordered(list(specs.values())):
        print(f"{spec.name:<20} {spec.priority:>8}  {spec.scope:<9} {spec.origin}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import main as explain

    return explain(args)


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import main as schema

    return schema(args)


def cmd_echo(args: argparse.Namespace) -> int:
    from .echo import main as echo

    return echo(args)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sidecar-proxy")
    except PackageNotFoundError:  # run from a source tree without installing
        from .. import __version__

        return __version__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="A sidecar reverse proxy for provider APIs and webhooks.")
    from .. import compiled

    built = " (request path compiled with mypyc)" if compiled() else ""
    p.add_argument("--version", action="version", version=f"sidecar {version()}{built}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str, config_default: str | None = "config.toml") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", "-c", default=config_default, help="path to config.toml")
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "start the sidecar")
    va = add("validate", cmd_validate, "check config.toml and every policy file; list every problem")
    va.add_argument("--offline", action="store_true",
                    help="do not contact secret services (aws-sm: references are not read)")
    add("plugins", cmd_plugins, "list registered plugins", None)
    ex = add("explain", cmd_explain, "show what the sidecar would do with one request (offline)")
    ex.add_argument("method", help="HTTP method, e.g. GET")
    ex.add_argument("url", help="a path (/openai/v1/models) or a URL on a listener (http://127.0.0.1:8443/webhooks/stripe)")
    ex.add_argument("--header", "-H", action="append", default=[], metavar="K:V", help="a request header (repeatable)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of text")
    sc = add("schema", cmd_schema, "print the JSON Schema (draft 2020-12) of policy files or of config.toml", None)
    sc.add_argument("kind", nargs="?", choices=("policy", "config"), default="policy")
    ec = sub.add_parser("echo", help="run an echo upstream answering each request as JSON",
                        description="run an echo upstream answering each request as JSON")
    ec.add_argument("--listen", default="127.0.0.1:9000", help="host:port (default 127.0.0.1:9000)")
    ec.set_defaults(fn=cmd_echo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
