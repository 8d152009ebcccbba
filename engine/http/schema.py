"""The JSON of the injection API: request and response Structs, and the field an error
names.

Requests are decoded by msgspec straight into these Structs (typed, no dict walk);
unknown keys are refused, so a misspelt "recipent" is a 400 naming it instead of a
silently ignored field. docs/openapi.json describes the same shapes; the tests check
every answer against it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from engine.mail.compose import ContentSpec, ListUnsubscribe

Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
Bindings = dict[str, Any]  # template variables: any JSON value


class RecipientIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: str
    name: str | None = None
    substitutions: Bindings = {}


class InjectRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    envelope_sender: str
    content: ContentSpec
    recipients: list[RecipientIn]
    substitutions: Bindings = {}
    campaign_id: str = ""
    tenant: str = ""
    priority: Priority = 5
    list_unsubscribe: ListUnsubscribe | None = None
    # The [[egress]] pool the messages leave from; "" = the [[egress_rules]] / route choice.
    egress_pool: str = ""


class FailedRecipient(msgspec.Struct):
    email: str
    error: str


class InjectResponse(msgspec.Struct):
    success_count: int
    fail_count: int
    failed_recipients: list[FailedRecipient]
    errors: list[str]


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: str
    field: str | None = None


class CampaignBody(msgspec.Struct):
    """GET /api/v1/campaigns/{id}: the counters of engine/queue/campaigns.py."""

    tenant: str
    campaign: str
    injected: int
    delivered: int
    deferred: int
    bounced: int
    bounced_by_class: dict[str, int]
    suppressed: int
    complained: int
    first_at: float
    last_at: float


class RequestError(Exception):
    """A request the API refuses as a whole: HTTP `status`, and the JSON field at fault."""

    def __init__(self, status: int, error: str, field: str | None = None, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field
        self.headers = headers
        if headers is None and status in (503, 507):
            # RFC 9110 §10.2.3: when a client refused for a passing condition may retry.
            self.headers = {"Retry-After": "60"}

    def body(self) -> ErrorBody:
        return ErrorBody(self.error, self.field)


_decoder = msgspec.json.Decoder(InjectRequest)
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]+)`")


def decode_request(data: bytes) -> InjectRequest:
    """Raises RequestError(400) naming the field ("recipients[3].email")."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as err:
        text = str(err)
        raise RequestError(400, _AT.sub("", text), field_of(text)) from None
    except msgspec.DecodeError as err:
        raise RequestError(400, f"malformed JSON: {err}") from None


def field_of(message: str) -> str:
    """The dotted path of msgspec's "... - at `$.a[1].b`", with a missing or unknown
    key's own name appended; "" for the document itself."""
    at = _AT.search(message)
    path = at.group("path").lstrip(".") if at else ""
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path
