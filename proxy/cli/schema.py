"""``sidecar schema [policy|config]``: JSON Schema (draft 2020-12) built from
the pydantic models of every registered plugin, third-party ones included.

Editors use it to complete and check policy files (taplo and VS Code's Even
Better TOML: ``#:schema ./policy.schema.json`` at the top of a file, or a
``[[rule]]`` in .taplo.toml). Descriptions come from a field's
``Field(description=...)``, else from the comment lines right above it in
the model's source (how this codebase documents its fields), else none.
"""

from __future__ import annotations

import argparse
import inspect
import io
import re
import sys
import tokenize
from typing import Any

import orjson
from pydantic import BaseModel

from ..config import CORE_POLICY_KEYS, PolicyCore, Settings, _members, load_settings

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_FIELD = re.compile(r"^\s+(\w+)\s*:")
_SETTINGS_SKIP = {"base_dir", "path", "extra_tables"}


def comment_descriptions(model: type) -> dict[str, str]:
    """{field: the comment lines above it (or at its line's end)} from the class source."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    comments[tok.start[0]] = tok.string.lstrip("#").strip()
        except (tokenize.TokenError, IndentationError):
            continue
        lines = source.splitlines()
        for i, line in enumerate(lines, start=1):
            m = _FIELD.match(line)
            if not m or line.lstrip().startswith("#") or m.group(1) not in getattr(cls, "model_fields", {}):
                continue
            above: list[str] = []
            j = i - 1
            while j in comments and lines[j - 1].lstrip().startswith("#"):
                above.insert(0, comments[j])
                j -= 1
            text = " ".join(above) or comments.get(i, "")
            if text:
                out[m.group(1)] = text
    return out


def _models(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``model``'s fields, by class name (pydantic's $defs names)."""
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    stack = [f.annotation for f in model.model_fields.values()]
    while stack:
        t = stack.pop()
        for m in _members(t):
            if isinstance(m, type) and issubclass(m, BaseModel):
                _models(m, seen)
            else:
                stack.extend(a for a in getattr(m, "__args__", ()) if a is not Ellipsis)
    return seen


def _describe(schema: dict[str, Any], model: type[BaseModel]) -> None:
    notes = comment_descriptions(model)
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop and name in notes:
            prop["description"] = notes[name]
    if "description" not in schema and model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        schema["description"] = inspect.cleandoc(model.__doc__).split("\n\n")[0]


def model_schema(model: type[BaseModel], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """``model``'s schema; its nested models go to ``defs`` as ``<prefix>.<Model>``."""
    schema = model.model_json_schema(ref_template=f"#/$defs/{prefix}.{{model}}", mode="validation")
    classes = _models(model, {})
    for name, sub in schema.pop("$defs", {}).items():
        if name in classes:
            _describe(sub, classes[name])
        defs[f"{prefix}.{name}"] = sub
    _describe(schema, model)
    return schema


def policy_schema(specs: dict[str, Any]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    core = model_schema(PolicyCore, "core", defs)
    props = {k: v for k, v in core["properties"].items() if k in CORE_POLICY_KEYS}
    for name, spec in sorted(specs.items()):
        defs[f"plugin.{name}"] = model_schema(spec.config, f"plugin.{name}", defs)
        ref: dict[str, Any] = {"$ref": f"#/$defs/plugin.{name}"}
        desc = spec.description + (f" (priority {spec.priority}, scope {spec.scope}, {spec.origin})")
        props[name] = {**ref, "description": desc.strip()}
    return {
        "$schema": DRAFT, "title": "sidecar policy file (policies/<name>.toml)",
        "description": "Core keys route, upstream and friends, plus one table per plugin.",
        "type": "object", "properties": props, "additionalProperties": False,
        "dependentRequired": {"route": ["upstream"], "upstream": ["route"]},
        "$defs": defs,
    }


def config_schema(settings_models: dict[str, type[BaseModel]], specs: dict[str, Any]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    props: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        if name in _SETTINGS_SKIP:
            continue
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        defs[f"config.{name}"] = model_schema(model, f"config.{name}", defs)
        props[name] = {"$ref": f"#/$defs/config.{name}"}
    for name, model in sorted(settings_models.items()):
        defs[f"config.{name}"] = model_schema(model, f"config.{name}", defs)
        props[name] = {"$ref": f"#/$defs/config.{name}"}
    routes = defs.get("config.inbound", {}).get("properties", {}).get("routes")
    if routes is not None:
        # [inbound.routes."/api".jwt]: each prefix holds tables of inbound-capable plugins.
        plugins = {}
        for name, spec in sorted(specs.items()):
            if spec.scope != "outbound":
                defs[f"plugin.{name}"] = model_schema(spec.config, f"plugin.{name}", defs)
                plugins[name] = {"$ref": f"#/$defs/plugin.{name}"}
        routes["additionalProperties"] = {"type": "object", "properties": plugins, "additionalProperties": False}
    return {"$schema": DRAFT, "title": "sidecar config.toml", "type": "object",
            "properties": props, "additionalProperties": False, "$defs": defs}


def build(kind: str, config: str | None) -> dict[str, Any]:
    from ..plugins import collect_settings_models, collect_specs, make_plugin_manager

    extra = load_settings(config).sidecar.plugins if config else []
    pm = make_plugin_manager(extra)
    if kind == "config":
        return config_schema(collect_settings_models(pm), collect_specs(pm))
    return policy_schema(collect_specs(pm))


def main(args: argparse.Namespace) -> int:
    sys.stdout.write(orjson.dumps(build(args.kind, args.config), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
