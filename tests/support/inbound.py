"""Helpers for tests of the inbound listener: config snippets and URLs."""

from __future__ import annotations

import json
import textwrap


def inbound_config(service_url: str, *, listen: str = "127.0.0.1:0", extra: str = "",
                   data_dir: str = "data") -> str:
    """An ``[inbound]`` table (plus ``extra`` TOML after it) for sidecar_factory's ``config``."""
    return textwrap.dedent(f"""\
        [inbound]
        listen = "{listen}"
        service_url = "{service_url}"
        data_dir = "{data_dir}"
        """) + textwrap.dedent(extra)


def inbound_url(sc) -> str:  # noqa: ANN001 - RunningSidecar
    return f"http://127.0.0.1:{sc.sidecar.ports['inbound']}"


def webhook_policy(path: str, scheme: str, secrets: list[str], raw: str = "", **extra: object) -> str:
    """A policy with a ``[webhook]`` table: ``extra`` strings are quoted, other values
    written as they print; ``raw`` is TOML added to the table as it is."""
    lines = ["[webhook]", f'path = "{path}"', f'scheme = "{scheme}"',
             "secrets = [" + ", ".join(f'"{s}"' for s in secrets) + "]"]
    for k, v in extra.items():
        if isinstance(v, str):
            lines.append(f"{k} = {json.dumps(v)}")
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        else:
            lines.append(f"{k} = {v}")
    if raw:
        lines.append(textwrap.dedent(raw))
    return "\n".join(lines) + "\n"
