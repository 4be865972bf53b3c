"""The results.json schema: loading it and checking a document against it.

The schema lives beside this module (``results.schema.json``, shipped as
package data) so that an installed iomux can check a results file anywhere.
jsonschema does the checking when it is installed (the dev venv has it); a
target or a bare CI box may have only the standard library, so a small
validator covering the subset of JSON Schema our schema uses takes over there.
Both report the first problem as one line naming its place in the document,
e.g. ``/targets/0/status: 'bogus' is not one of ['passed', 'failed', 'not run']``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict, List, Optional

SCHEMA_FILE = "results.schema.json"


class ResultsError(ValueError):
    """A results document that does not follow the schema, or cannot be read."""


def load_schema() -> Dict[str, Any]:
    """Return the results.json JSON Schema as a dict.

    Returns:
        The parsed schema (draft 2020-12).
    """
    text = resources.files("iomux.report").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema: Dict[str, Any] = json.loads(text)
    return schema


def validate(doc: Any) -> None:
    """Check a results document against the schema.

    Parameters:
        doc: the parsed results.json document.

    Raises:
        ResultsError: with one line naming the JSON pointer of the first problem.
    """
    schema = load_schema()
    try:
        import jsonschema
    except ImportError:
        problem = _MiniValidator(schema).first_error(doc)
        if problem is not None:
            raise ResultsError(problem) from None
        return
    validator = jsonschema.Draft202012Validator(schema)
    best = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if best is not None:
        raise ResultsError(f"{_pointer(list(best.absolute_path))}: {_short(best.message)}")


def _pointer(parts: List[Any]) -> str:
    return "/" + "/".join(str(p) for p in parts) if parts else "(document root)"


def _short(message: str, limit: int = 200) -> str:
    # jsonschema quotes the whole offending instance; a target's test list can be
    # thousands of characters, and the error must stay one readable line.
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


_JSON_TYPES: Dict[str, type] = {
    "object": dict,
    "array": list,
    "string": str,
    "null": type(None),
    "boolean": bool,
}


def _is_type(value: Any, name: str) -> bool:
    # bool is a subclass of int in Python but not a number in JSON.
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[name])


class _MiniValidator:
    """The JSON Schema keywords results.schema.json uses, and no others.

    Supported: type, enum, required, properties, additionalProperties, items,
    minimum, minLength, $ref (local #/$defs/...), allOf, if/then. Keep the
    schema within this list, or extend it here, so that stdlib-only hosts check
    the same rules as jsonschema does.
    """

    def __init__(self, root: Dict[str, Any]) -> None:
        self.root = root

    def first_error(self, doc: Any) -> Optional[str]:
        return self._check(self.root, doc, [])

    def _resolve(self, ref: str) -> Dict[str, Any]:
        node: Any = self.root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        resolved: Dict[str, Any] = node
        return resolved

    def _check(self, schema: Dict[str, Any], value: Any, path: List[Any]) -> Optional[str]:
        where = _pointer(path)
        if "$ref" in schema:
            problem = self._check(self._resolve(schema["$ref"]), value, path)
            if problem:
                return problem
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, n) for n in names):
                return f"{where}: {_short(repr(value))} is not of type {' or '.join(map(repr, names))}"
        if "enum" in schema and value not in schema["enum"]:
            return f"{where}: {_short(repr(value))} is not one of {schema['enum']!r}"
        if isinstance(value, str) and len(value) < schema.get("minLength", 0):
            return f"{where}: {value!r} is too short"
        if (
            "minimum" in schema
            and _is_type(value, "number")
            and value < schema["minimum"]
        ):
            return f"{where}: {value!r} is less than the minimum of {schema['minimum']!r}"
        if isinstance(value, dict):
            problem = self._check_object(schema, value, path)
            if problem:
                return problem
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                problem = self._check(schema["items"], item, [*path, i])
                if problem:
                    return problem
        for sub in schema.get("allOf", []):
            if "if" in sub and self._check(sub["if"], value, path) is None:
                problem = self._check(sub.get("then", {}), value, path)
            elif "if" in sub:
                problem = self._check(sub.get("else", {}), value, path)
            else:
                problem = self._check(sub, value, path)
            if problem:
                return problem
        return None

    def _check_object(
        self, schema: Dict[str, Any], value: Dict[str, Any], path: List[Any]
    ) -> Optional[str]:
        for key in schema.get("required", []):
            if key not in value:
                return f"{_pointer(path)}: {key!r} is a required property"
        props: Dict[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                sub: Any = props[key]
            elif extra is False:
                return f"{_pointer(path)}: additional property {key!r} is not allowed"
            else:
                sub = extra if isinstance(extra, dict) else None
            if sub:
                problem = self._check(sub, item, [*path, key])
                if problem:
                    return problem
        return None
