"""Per-recipient templates: Jinja2 syntax in a sandbox, compiled once, rendered per recipient.

Templates come only from the request (strings); the environments have no loader, so
`{% include %}`, `{% import %}` and `{% extends %}` are refused when the template is
compiled. Jinja2's `ImmutableSandboxedEnvironment` refuses attributes that start with
`_` and the internals of functions and frames (`__class__`, `__globals__`, ...), and
the immutable variant also refuses methods that change a list or dict, so one
recipient's render cannot change the bindings the next recipient sees. On top of it:

- an unsafe attribute is an error (Jinja2 alone renders it as an empty string), and
  an attribute named with a leading `_` is refused at compile time already;
- `range()` is capped at `MAX_RANGE` items, `*` and `**` are capped so `{{ 'x' * 10**9 }}`
  cannot allocate a gigabyte, and one field's rendered output at `MAX_OUTPUT` characters.

These bound the obvious mistakes, not a client who means to burn CPU: loops over loops
are allowed. The HTTP API is for holders of a bearer token.

Undefined variables render as empty strings (so do attributes of them, and `None`):
a newsletter with a missing `first` says "Hello ," rather than failing the recipient.
Text fields render without autoescaping; `html_body` autoescapes (`&`, `<`, `>`, quotes),
so a recipient's name cannot inject markup; `{{ value|safe }}` opts out.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from jinja2 import ChainableUndefined, TemplateSyntaxError, Undefined, nodes
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE: Final = 10_000
MAX_REPEAT: Final = 1_000_000      # characters or items that `*` may build
MAX_OUTPUT: Final = 16 * 1024 * 1024  # characters one field may render to
_MAX_POWER: Final = 64             # the largest exponent `**` takes

# Files and other templates: the environments have no loader, and a request's template
# must not even try to name one.
_REFUSED_NODES: Final = {
    nodes.Include: "{% include %}", nodes.Import: "{% import %}",
    nodes.FromImport: "{% from ... import %}", nodes.Extends: "{% extends %}",
}


class TemplateError(ValueError):
    """A template (or content field) that cannot be used at all; found at compile time.
    `.field` names it ("content.subject", "content.headers.X-Foo"); str() is "field: problem"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class RenderError(ValueError):
    """One recipient's render failed (a runtime error, a sandbox refusal, a header value
    that became unsafe). `.field` names the field; str() is "field: problem"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _HeaderLineBreak(Exception):
    """A substitution in a header block produced a line break (raw content)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with unsafe attributes as errors and capped repetition."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja2 returns an Undefined that prints as ""; a probe for internals is
        # better told no than silently given an empty string.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise SecurityError(f"repetition builds more than {MAX_REPEAT} items")
        elif isinstance(right, int | float) and abs(right) > _MAX_POWER:
            raise SecurityError(f"exponent larger than {_MAX_POWER}")
        return super().call_binop(context, operator, left, right)


def _capped_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of more than {MAX_RANGE} items")
    return rng


def _blank_none(value: Any) -> Any:
    if value is None:
        return ""
    if callable(value) and not isinstance(value, Undefined):
        # `{{ email.upper }}` would print "<built-in method upper of str object at 0x...>"
        raise SecurityError("a function or class cannot be printed; call it")
    return value


def _no_line_breaks(value: Any) -> Any:
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        raise _HeaderLineBreak
    return _blank_none(value)


def _environment(*, autoescape: bool, finalize: Callable[[Any], Any]) -> _Sandbox:
    env = _Sandbox(
        loader=None, autoescape=autoescape, undefined=ChainableUndefined, finalize=finalize,
        keep_trailing_newline=True,  # a body's last line break is the sender's, keep it
        auto_reload=False, cache_size=0,
    )
    env.globals["range"] = _capped_range
    env.globals.pop("lipsum", None)  # placeholder text has no place in mail
    return env


TEXT_ENV: Final = _environment(autoescape=False, finalize=_blank_none)
HTML_ENV: Final = _environment(autoescape=True, finalize=_blank_none)
# The header block of raw content: a substitution must not start a new header.
HEADER_ENV: Final = _environment(autoescape=False, finalize=_no_line_breaks)
_GLOBALS: Final = dict(TEXT_ENV.globals)


def merge_bindings(shared: Mapping[str, object] | None, own: Mapping[str, object] | None,
                   email: str, name: str | None) -> dict[str, object]:
    """One recipient's variables: the shared substitutions, overridden by the
    recipient's own, overridden by `email` and `name` (always bound; name "" if absent)."""
    merged: dict[str, object] = dict(shared) if shared else {}
    if own:
        merged.update(own)
    merged["email"] = email
    merged["name"] = name or ""
    return merged


def template_vars(bindings: Mapping[str, object]) -> dict[str, Any]:
    """The render variables of one recipient: the sandbox's globals (`range`, `cycler`,
    ...) under the bindings. Built once per recipient and shared by every field."""
    merged: dict[str, Any] = dict(_GLOBALS)
    merged.update(bindings)
    return merged


def has_syntax(source: str) -> bool:
    """Whether `source` has any Jinja2 syntax; without it the output is the source."""
    return "{{" in source or "{%" in source or "{#" in source


class FieldTemplate:
    """One compiled field. `constant` is the output when the source has no template
    syntax (then nothing is rendered per recipient)."""

    __slots__ = ("field", "constant", "_template")

    def __init__(self, field: str, template: Template | None, constant: str | None) -> None:
        self.field = field
        self._template = template
        self.constant = constant

    def render(self, variables: dict[str, Any]) -> str:
        """The field for one recipient; `variables` from `template_vars`. Raises RenderError."""
        if self._template is None:
            assert self.constant is not None
            return self.constant
        template = self._template
        try:
            ctx = template.new_context(variables, shared=True)
            return _bounded_join(template.root_render_func(ctx), self.field)
        except RenderError:
            raise
        except _HeaderLineBreak:
            raise RenderError(self.field, "a substitution in the header block contains a line break"
                                          " (it would start a new header field)") from None
        except Exception as exc:  # the template's own runtime errors, SecurityError included
            raise RenderError(self.field, _describe(exc, template)) from None


def compile_field(field: str, source: str, *, env: _Sandbox = TEXT_ENV) -> FieldTemplate:
    """Compile one field's template. Raises TemplateError naming the field and line."""
    if not has_syntax(source):
        return FieldTemplate(field, None, source)
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(field, f"line {exc.lineno}: {exc.message}") from None
    _check_nodes(field, ast)
    try:
        template = env.from_string(ast)
    except TemplateSyntaxError as exc:  # e.g. a filter that does not exist
        raise TemplateError(field, f"line {exc.lineno}: {exc.message}") from None
    return FieldTemplate(field, template, None)


def _check_nodes(field: str, ast: nodes.Template) -> None:
    for node in ast.find_all(tuple(_REFUSED_NODES)):
        what = _REFUSED_NODES[type(node)]
        raise TemplateError(field, f"line {node.lineno}: {what} is not allowed: templates come only"
                                   " from the request, never from files")
    for attr in ast.find_all(nodes.Getattr):
        assert isinstance(attr, nodes.Getattr)
        if attr.attr.startswith("_"):
            raise TemplateError(field, f"line {attr.lineno}: attribute {attr.attr!r} is not allowed"
                                       " (names starting with '_' are internal)")


def _bounded_join(parts: Iterable[str], field: str) -> str:
    out: list[str] = []
    total = 0
    for part in parts:
        total += len(part)
        if total > MAX_OUTPUT:
            raise RenderError(field, f"renders to more than {MAX_OUTPUT} characters")
        out.append(part)
    return "".join(out)


def _describe(exc: BaseException, template: Template) -> str:
    """The error with the template line it happened on, when the traceback shows it."""
    line = None
    tb: types.TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__jinja_template__") is template:
            line = template.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    kind = "refused by the sandbox" if isinstance(exc, SecurityError) else type(exc).__name__
    where = f"line {line}: " if line is not None else ""
    return f"{where}{kind}: {exc}"
