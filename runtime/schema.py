"""One-line errors for records checked against a JSON Schema (bundle.json, the line config): the first problem,
naming the file, the field as written in JavaScript (input.size[0], mqtt.queue) and what it must be.

A schema field may carry an "x-message" (an annotation the validator ignores) that says in words what the field
must be; the error quotes the deepest one on the failing field's way, e.g. "input.size must be [height, width] of
whole numbers ≥ 1". A field marked "x-secret" never has its value quoted."""

import json
import math

import jsonschema

from edgeinspect.runtime.console import InspectError

# "integer" means a whole number written without a fraction: 64, not 64.0 (the standard's checker takes both)
_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool))
_STRICT = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_TYPES)


def strict_validator(schema: dict) -> jsonschema.protocols.Validator:
    return _STRICT(schema)


def shown(value) -> str:
    """A value as an error message quotes it: short JSON, or what it is."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=str)
    if isinstance(value, list) and len(text) > 60:
        return f"a list of {len(value)}"
    if isinstance(value, dict) and len(text) > 60:
        return "an object" if value else "{}"
    return text if len(text) <= 60 else text[:57] + "..."


def field_name(path) -> str:
    """A field's path as written in JavaScript: input.size, files["model.onnx"].sha256, input.size[0]."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        elif step.isidentifier():
            text += f".{step}" if text else step
        else:
            text += f"[{json.dumps(step)}]"
    return text


def _explained(error: jsonschema.ValidationError, schema: dict) -> tuple[list, str | None]:
    """The deepest field on the error's way whose schema has an "x-message": (its path, the message)."""
    at, found = 0, ([], schema.get("x-message"))
    steps = list(error.absolute_path)
    keys = list(error.absolute_schema_path)
    index = 0
    while index < len(keys):
        key = keys[index]
        if key in ("properties", "patternProperties", "anyOf", "oneOf", "allOf") and index + 1 == len(keys):
            break
        if key in ("properties", "patternProperties"):
            schema, index, at = schema[key][keys[index + 1]], index + 2, at + 1
        elif key in ("items", "additionalProperties"):
            schema, index, at = schema[key], index + 1, at + 1
        elif key in ("anyOf", "oneOf", "allOf"):
            schema, index = schema[key][keys[index + 1]], index + 2
        else:
            break
        if isinstance(schema, dict) and "x-message" in schema:
            found = (steps[:at], schema["x-message"])
    return found


def _non_finite(value, path=()) -> tuple | None:
    """The path of the first NaN or infinite number in a record (JSON and TOML configs have none), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


def check_finite(record, where) -> None:
    bad = _non_finite(record)
    if bad is not None:
        value = record
        for step in bad:
            value = value[step]
        raise InspectError(f"{where}: {field_name(bad)} must be a finite number, got {value}")


def _node(schema: dict, path) -> dict:
    """The schema of the field at `path` ({} where there is none)."""
    for step in path:
        if not isinstance(schema, dict):
            return {}
        schema = schema.get("items", {}) if isinstance(step, int) else schema.get("properties", {}).get(step, {})
    return schema if isinstance(schema, dict) else {}


def check_record(record, schema: dict, validator, where) -> None:
    """One-line InspectError naming `where`, the field and what it must be, for the first problem found."""
    check_finite(record, where)
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is None:
        return
    if error.validator == "required":
        missing = next(name for name in error.validator_value if name not in error.instance)
        path = [*error.absolute_path, missing]
        wanted = _node(schema, path).get("x-message")
        raise InspectError(f"{where}: {field_name(path)} is missing" + (f" (it must be {wanted})" if wanted else ""))
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(_node(schema, error.absolute_path).get("properties", {}))
        unknown = sorted(set(error.instance) - known)[0]
        raise InspectError(f"{where}: unknown key {field_name([*error.absolute_path, unknown])} (known there: "
                           f"{', '.join(sorted(known))})")
    if "propertyNames" in error.absolute_schema_path:
        names = _node(schema, error.absolute_path).get("propertyNames", {})
        raise InspectError(f"{where}: {field_name(error.absolute_path)} lists {json.dumps(error.instance)}, which "
                           f"is not {names.get('x-message', 'an allowed name')}")
    path, message = _explained(error, schema)
    value = record
    for step in path:
        value = value[step]
    if not path:
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
                type(None): "null"}.get(type(record), type(record).__name__)
        raise InspectError(f"{where}: must be {message}, got {kind}")
    if message is None:
        raise InspectError(f"{where}: {field_name(error.absolute_path)}: {error.message}")
    got = f"a {type(value).__name__}" if _node(schema, path).get("x-secret") else shown(value)  # never a password
    raise InspectError(f"{where}: {field_name(path)} must be {message}, got {got}")
