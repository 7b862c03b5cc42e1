"""The ``sidecar`` command: run, validate, plugins."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .config import load_settings
from .errors import ConfigError


def check(config: str | None, warnings: list[str] | None = None, *, offline: bool = True) -> list[str]:
    """Every problem in config.toml and policies/, as ``file: field: reason`` lines.

    ``warnings`` collects what does not stop a start (a secret reference that
    does not resolve now: the sidecar starts and that route answers 503).
    Unless ``offline``, references to remote sources that can be probed
    (``aws-sm:``) are read once each.
    """
    from .runtime import Runtime

    async def _check() -> list[str]:
        try:
            rt = Runtime(load_settings(config))
        except ConfigError as e:
            return e.problems
        try:
            rt.compile(rt.load_policies())
            if warnings is not None:
                warnings.extend(rt.secrets.check())
                if not offline:
                    warnings.extend(await rt.secrets.probe())
        except ConfigError as e:
            return e.problems
        finally:
            await rt.pools.close()
            await rt.state.close()
        return []

    return asyncio.run(_check())


def cmd_run(args: argparse.Namespace) -> int:
    from .server import run

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
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("ok: config and policies are valid")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import collect_specs, make_plugin_manager, ordered

    extra = load_settings(args.config).sidecar.plugins if args.config else []
    specs = collect_specs(make_plugin_manager(extra))
    print(f"{'plugin':<20} {'priority':>8}  {'scope':<9} origin")
    for spec in ordered(list(specs.values())):
        print(f"{spec.name:<20} {spec.priority:>8}  {spec.scope:<9} {spec.origin}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="A sidecar reverse proxy for provider APIs and webhooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("run", cmd_run, "start the sidecar"),
                            ("validate", cmd_validate, "check config.toml and every policy file"),
                            ("plugins", cmd_plugins, "list registered plugins")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", default="config.toml" if name != "plugins" else None,
                       help="path to config.toml")
        if name == "validate":
            p.add_argument("--offline", action="store_true",
                           help="do not contact secret services (aws-sm: references are not read)")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
