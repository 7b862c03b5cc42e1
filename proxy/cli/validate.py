"""``sidecar validate``: every problem of every file, in one run.

``sidecar run`` stops at the first layer that fails (a bad config.toml means
no runtime to load policies with). Validation goes on instead: a config table
with problems is reported and replaced by its defaults, a policy file with
problems is reported and left out, and the rest is still loaded, checked as a
set (``sidecar_policies_check``) and compiled, so one run lists everything
(decK's ``validate`` and ``nginx -t`` report the same way).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import (_SETTINGS_TABLES, Settings, _read_toml, pydantic_problems, read_policies, suggest,
                      validate_table)
from ..errors import ConfigError


def _settings(config: str | None, problems: list[str]) -> tuple[Settings, Any]:
    """Settings from the valid tables of config.toml (defaults for the others)
    and the plugin manager; problems are appended."""
    from ..plugins import collect_settings_models, collect_specs, make_plugin_manager

    if config is None:
        base = Settings(base_dir=Path.cwd())
        return base, make_plugin_manager()
    path = Path(config).resolve()
    try:
        raw = _read_toml(path)
    except ConfigError as e:
        problems += e.problems
        return Settings(base_dir=path.parent, path=path), make_plugin_manager()
    core: dict[str, Any] = {}
    for name, table in raw.items():   # file order: the same output every run
        if name not in _SETTINGS_TABLES:
            continue
        model = Settings.model_fields[name].annotation
        try:
            core[name] = model.model_validate(table)  # type: ignore[union-attr]
        except ValidationError as e:
            problems += pydantic_problems(path, e, prefix=name, model=model)  # type: ignore[arg-type]
    try:
        pm = make_plugin_manager(core["sidecar"].plugins if "sidecar" in core else [])
    except ConfigError as e:
        problems += [p.replace("config:", f"{path}:", 1) for p in e.problems]
        pm = make_plugin_manager()
    specs = collect_specs(pm)
    models = collect_settings_models(pm)
    extra: dict[str, Any] = {}
    for name, table in raw.items():
        if name in _SETTINGS_TABLES:
            continue
        model = models.get(name)
        if model is None:
            problems.append(f"{path}: {name}: unknown table{suggest(name, _SETTINGS_TABLES | set(models))}")
            continue
        if validate_table(path, name, table, model, problems, {"plugin_specs": specs}) is not None:
            extra[name] = table
    return Settings(**core, base_dir=path.parent, path=path, extra_tables=extra), pm


def collect(config: str | None, *, offline: bool = True) -> tuple[list[str], list[str]]:
    """(problems, warnings) of config.toml and every policy file. Unless
    ``offline``, references to remote sources that can be probed (``aws-sm:``)
    are read once each."""
    from ..runtime import Runtime

    problems: list[str] = []
    settings, pm = _settings(config, problems)

    async def _policies() -> list[str]:
        warnings: list[str] = []
        rt = Runtime(settings, pm)
        try:
            policies, found = read_policies(settings, rt.plugin_configs, partial=True)
            problems.extend(found)
            problems.extend(rt.set_problems(policies))
            try:
                rt.compile(policies)
            except ConfigError as e:
                problems.extend(e.problems)
            warnings.extend(rt.secrets.check())
            if not offline:
                warnings.extend(await rt.secrets.probe())
        finally:
            await rt.pools.close()
            await rt.state.close()
        return warnings

    try:
        warnings = asyncio.run(_policies())
    except ConfigError as e:  # a plugin refusing the settings as a whole
        problems.extend(e.problems)
        warnings = []
    seen: set[str] = set()
    unique = [p for p in problems if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    return unique, warnings
