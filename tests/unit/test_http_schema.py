"""The injection API's shapes: docs/openapi.json against the msgspec Structs the server
decodes and encodes, the field an error names, bearer tokens, address syntax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator

from engine import config as config_mod
from engine.http import schema
from engine.http.envelope import mailbox_problem
from engine.http.tokens import check_http, load_tokens, parse_tokens
from engine.mail.compose import Attachment, ContentSpec, ListUnsubscribe
from engine.queue.campaigns import CampaignCounts
from tests.openapi_check import check_response, document

# Struct → the OpenAPI component describing the same JSON object.
PAIRS: list[tuple[type[msgspec.Struct], str]] = [
    (schema.InjectRequest, "InjectRequest"),
    (schema.RecipientIn, "Recipient"),
    (ContentSpec, "Content"),
    (Attachment, "Attachment"),
    (ListUnsubscribe, "ListUnsubscribe"),
    (schema.InjectResponse, "InjectResponse"),
    (schema.FailedRecipient, "FailedRecipient"),
    (schema.ErrorBody, "Error"),
    (schema.CampaignBody, "Campaign"),
]


def test_document_is_openapi_31_with_valid_schemas() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    Draft202012Validator.check_schema({"$defs": doc["components"]["schemas"]})
    assert set(doc["paths"]) == {"/api/v1/inject", "/api/v1/campaigns/{id}"}
    inject = doc["paths"]["/api/v1/inject"]["post"]["responses"]
    assert set(inject) >= {"200", "400", "401", "413", "415", "503", "507"}
    assert set(doc["paths"]["/api/v1/campaigns/{id}"]["get"]["responses"]) >= {"200", "401", "404"}


@pytest.mark.parametrize(("struct", "name"), PAIRS)
def test_document_matches_the_structs(struct: type[msgspec.Struct], name: str) -> None:
    """Same property names and the same required ones as what msgspec decodes/encodes."""
    (_, components) = msgspec.json.schema_components([struct])
    mine = components[struct.__name__]
    theirs = document()["components"]["schemas"][name]
    assert set(theirs["properties"]) == set(mine["properties"]), name
    assert set(theirs.get("required", [])) == set(mine.get("required", [])), name


def test_campaign_body_has_every_counter() -> None:
    assert set(schema.CampaignBody.__struct_fields__) == set(CampaignCounts.__struct_fields__)


@pytest.mark.parametrize(("message", "field"), [
    ("Expected `str`, got `int` - at `$.recipients[3].email`", "recipients[3].email"),
    ("Object missing required field `recipients`", "recipients"),
    ("Object missing required field `email` - at `$.recipients[0]`", "recipients[0].email"),
    ("Object contains unknown field `recipent`", "recipent"),
    ("Expected `int` >= 0 - at `$.priority`", "priority"),
    ("Expected `object`, got `array`", ""),
])
def test_field_of_msgspec_errors(message: str, field: str) -> None:
    assert schema.field_of(message) == field


def test_decode_request_errors() -> None:
    with pytest.raises(schema.RequestError) as caught:
        schema.decode_request(b'{"envelope_sender": "a@b.test", "content": {"subject": 1},'
                              b' "recipients": []}')
    assert (caught.value.status, caught.value.field) == (400, "content.subject")
    with pytest.raises(schema.RequestError) as caught:
        schema.decode_request(b"{")
    assert caught.value.field is None and caught.value.error.startswith("malformed JSON")
    req = schema.decode_request(b'{"envelope_sender": "a@b.test", "content": {"raw": "x"},'
                                b' "recipients": [{"email": "c@d.test"}]}')
    assert req.priority == 5 and req.recipients[0].name is None


def test_error_bodies_fit_the_document() -> None:
    for status, err in [(400, schema.RequestError(400, "bad", "recipients[0].email")),
                        (413, schema.RequestError(413, "too big"))]:
        body: Any = msgspec.json.decode(msgspec.json.encode(err.body()))
        check_response("/api/v1/inject", "post", status, body)
    assert schema.RequestError(507, "full").headers == {"Retry-After": "60"}


def test_tokens_file(tmp_path: Path) -> None:
    tokens = parse_tokens("# clients\nshop:aaaaaaaaaaaaaaaaaaaa1\n\n  bbbbbbbbbbbbbbbbbbbb2  \n", "f")
    assert len(tokens) == 2
    assert tokens.match("aaaaaaaaaaaaaaaaaaaa1") == "shop"
    assert tokens.match("bbbbbbbbbbbbbbbbbbbb2") == ""
    assert tokens.match("aaaaaaaaaaaaaaaaaaaa") is None
    assert tokens.match("shop:aaaaaaaaaaaaaaaaaaaa1") is None
    with pytest.raises(config_mod.ConfigError, match="line 2: token shorter"):
        parse_tokens("# x\nshort\n", "f")
    with pytest.raises(config_mod.ConfigError, match="line 1: a token is letters"):
        parse_tokens("name:with space in it 1234567\n", "f")
    with pytest.raises(config_mod.ConfigError, match="no token in it"):
        parse_tokens("# only a comment\n", "f")
    missing = tmp_path / "nope"
    with pytest.raises(config_mod.ConfigError,
                       match=f"http.tokens_file: cannot read {missing}: No such file"):
        load_tokens(str(missing))


def test_check_http(tmp_path: Path) -> None:
    def cfg(**http: Any) -> config_mod.Config:
        return config_mod.from_dict({"http": {"listen": "127.0.0.1:0", **http}})

    with pytest.raises(config_mod.ConfigError, match="http.tokens_file: cannot read"):
        check_http(cfg(tokens_file=str(tmp_path / "missing")))
    good = tmp_path / "tokens"
    good.write_text("k:0123456789abcdef0123\n")
    check_http(cfg(tokens_file=str(good)))
    check_http(config_mod.from_dict({}))  # off: nothing to check


@pytest.mark.parametrize(("address", "ok"), [
    ("a@example.test", True),
    ("first.last+tag@sub.example.test", True),
    ('"quoted local"@example.test', True),
    ("user@[192.0.2.1]", True),
    ("user@[IPv6:2001:db8::1]", True),
    ("jörg@bücher.example", True),  # RFC 6531
    ("", False),
    ("no-at-sign", False),
    ("two@@example.test", False),
    ("a@-bad-.test", False),
    (" a@example.test", False),
    ("@route:a@example.test", False),
    ("a@[300.0.0.1]", False),
    ("a@" + "x" * 250 + ".test", False),
    ("a..b@example.test", False),
])
def test_mailbox_syntax(address: str, ok: bool) -> None:
    assert (mailbox_problem(address) is None) is ok, mailbox_problem(address)
