"""Parameter overrides written into params.yaml, like `dvc exp run -S key=value`.

    apply_overrides(repo / "params.yaml", {"train.steps": 20, "evaluate.max_clips": "1"})

String values are parsed as YAML ("20" -> 20, "null" -> None, "[ssim, lmd]" -> a list), the file is edited in
place with ruamel.yaml's round trip (comments, order and layout stay), unknown keys are refused, and the
result must load with `singer.config.load_config` before it replaces params.yaml (so a bad value fails the
flow before any stage runs, and params.yaml stays as it was).
"""

from __future__ import annotations

import copy
import io
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.common import FlowInputError


def parse_value(value: Any) -> Any:
    """Strings are parsed as YAML, as `dvc exp run -S` and `singer -S` do; other values are kept."""
    if isinstance(value, str):
        import yaml

        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise FlowInputError(f"cannot parse {value!r} as a YAML value: {exc}") from None
    return value


def check_key(key: str) -> None:
    """Refuse a dotted key that names no parameter of `singer.config.Config` (typos fail loudly).

    `presets.<name>.…` and keys inside free-form mappings (`release.gate.<metric>`) are left to the full
    validation that follows."""
    from pydantic import BaseModel

    from singer.config import Config

    parts = key.split(".")
    if not key or not all(parts):
        raise FlowInputError(f"bad parameter key {key!r}: expected dotted names like train.steps")
    if parts[0] == "presets":
        if len(parts) < 3:
            raise FlowInputError(f"bad parameter key {key!r}: expected presets.<preset>.<section>.<name>")
        return
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        by_alias = {f.alias: name for name, f in fields.items() if f.alias}
        name = by_alias.get(part, part)
        where = ".".join(parts[:i]) or "params.yaml"
        if name not in fields:
            known = sorted(f.alias or n for n, f in fields.items())
            raise FlowInputError(f"unknown parameter {key!r}: {where} has no {part!r} (it has: {', '.join(known)})")
        annotation = fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if i < len(parts) - 1 and getattr(annotation, "__origin__", None) is not dict:
            raise FlowInputError(f"unknown parameter {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        return
    raise FlowInputError(f"parameter key {key!r} names a whole section; set its values one by one")


def _yaml_round_trip():
    from ruamel.yaml import YAML

    y = YAML()  # round trip: comments, key order, flow lists and quoting survive
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap long lines
    # ruamel writes None as an empty value; params.yaml spells it `null` (and a byte-identical round trip
    # of an untouched file depends on it)
    y.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _to_node(value: Any) -> Any:
    """Lists and dicts as flow-style ruamel nodes (`[a, b]`, `{k: v}`), the style params.yaml uses."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        node = CommentedSeq(_to_node(v) for v in value)
        node.fa.set_flow_style()
        return node
    if isinstance(value, dict):
        node = CommentedMap((k, _to_node(v)) for k, v in value.items())
        node.fa.set_flow_style()
        return node
    return value


def _append_key(mapping: Any, key: str, value: Any) -> None:
    """Add a key at the end of a mapping. The blank lines / comment lines that followed the old last key
    belong below the new one (else the new key would sit after the section's trailing blank line)."""
    keys = list(mapping)
    mapping[key] = value
    if not keys:
        return
    tokens = mapping.ca.items.get(keys[-1])
    token = tokens[2] if tokens and len(tokens) > 2 else None
    if token is None or not isinstance(getattr(token, "value", None), str):
        return
    head, _, rest = token.value.partition("\n")
    if not rest:
        return
    moved = copy.deepcopy(token)
    token.value = head + "\n"
    moved.value = "\n" + rest
    mapping.ca.items[key] = [None, None, moved, None]


def _set_dotted(tree: Any, key: str, value: Any) -> tuple[bool, Any]:
    """Set `a.b.c` in a ruamel tree; returns (existed, old value). Missing sections are created."""
    from ruamel.yaml.comments import CommentedMap

    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = CommentedMap()
            _append_key(node, part, child)
        elif not isinstance(child, dict):
            raise FlowInputError(f"parameter {key!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    existed = leaf in node
    old = node.get(leaf)
    if existed:
        node[leaf] = _to_node(value)
    else:
        _append_key(node, leaf, _to_node(value))
    return existed, old


def render_overrides(text: str, overrides: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """params.yaml text with the overrides written in, and {key: {"old", "new"}} for the values changed."""
    y = _yaml_round_trip()
    tree = y.load(text)
    changes: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        check_key(key)
        value = parse_value(raw)
        existed, old = _set_dotted(tree, key, value)
        old_plain = _plain(old) if existed else "<unset>"
        if old_plain != value:
            changes[key] = {"old": old_plain, "new": value}
    buf = io.StringIO()
    y.dump(tree, buf)
    return buf.getvalue(), changes


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def validate_params_text(text: str, where: Path) -> None:
    """Load the text the way every stage will (`singer.config.load_config`); a clear error if it fails."""
    from pydantic import ValidationError

    from singer.config import load_config

    tmp = where.with_name(f".{where.name}.check-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text)
        load_config(tmp)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise FlowInputError(f"params.yaml would be invalid: {problems}") from None
    except (ValueError, TypeError) as exc:
        raise FlowInputError(f"params.yaml would be invalid: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def apply_overrides(params: str | os.PathLike, overrides: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Write the overrides into params.yaml (like `dvc exp run -S`) after checking the result loads.

    Without overrides the file is only validated. The file is replaced atomically and only when its text
    changes. Returns {key: {"old", "new"}} for every value that changed."""
    params = Path(params)
    text = params.read_text()
    new_text, changes = render_overrides(text, overrides or {})
    validate_params_text(new_text, params)
    if new_text != text:
        tmp = params.with_name(f".{params.name}.tmp-{os.getpid()}")
        tmp.write_text(new_text)
        os.chmod(tmp, params.stat().st_mode & 0o777)
        os.replace(tmp, params)
    return changes


def parse_set_options(parser, items: list[str]) -> dict[str, str] | None:
    """`--set KEY=VALUE` options (the CLIs of both flows) -> {key: value}, None when there are none."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value
    return overrides or None
