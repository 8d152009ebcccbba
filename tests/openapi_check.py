"""Checks answers of the HTTP injection API against docs/openapi.json.

`check_response(path, method, status, body)` validates a decoded JSON body with the
response schema the document gives that operation and status (JSON Schema 2020-12,
what OpenAPI 3.1 uses); a status the document does not list is a failure too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

OPENAPI = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


@functools.cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(OPENAPI.read_text())
    return doc


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    """The schema of the answer, resolved against the document's components."""
    op = document()["paths"][path][method.lower()]
    responses = op["responses"]
    assert str(status) in responses, f"{method} {path}: status {status} is not in the OpenAPI document"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    # Unknown keywords are ignored by JSON Schema, so the components ride along and
    # "#/components/schemas/X" resolves inside this one schema document.
    return {"components": document()["components"], **schema}


def check_response(path: str, method: str, status: int, body: Any) -> None:
    """Raises jsonschema.ValidationError when `body` does not fit the document. A path
    or method the document does not have can only be an error answer: the Error schema."""
    if method.lower() not in document()["paths"].get(path, {}):
        assert status >= 400, f"{method} {path} answered {status}"
        schema = {"components": document()["components"], "$ref": "#/components/schemas/Error"}
        Draft202012Validator(schema).validate(body)
        return
    Draft202012Validator(response_schema(path, method, status)).validate(body)


def check_request(body: Any) -> None:
    """A request body as the document describes it (for the examples the tests send)."""
    schema = document()["paths"]["/api/v1/inject"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    Draft202012Validator({"components": document()["components"], **schema}).validate(body)
