"""The one exception the serving path raises; the HTTP layer turns it into OpenAI error JSON."""

from __future__ import annotations

import re

_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "model_not_allowed"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("service_unavailable_error", "engine_unavailable"),
}


class ServingError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        # a status without its own entry: the client's fault below 500 (as OpenAI types them), else the server's
        self.type, default_code = _TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.code = code if code is not None else default_code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def reworded(self, terms: Terms) -> ServingError:
        """This error with its message and param in `terms` (`in_terms`), the one raised; its args follow."""
        self.message = in_terms(self.message, terms)
        self.args = (self.message,)
        if self.param:
            self.param = in_terms(self.param, terms)
        return self


# An API over the chat path (the Responses API, the Messages API): the chat request's field names, each a pattern and
# its replacement, as that API's client sent them
Terms = tuple[tuple[re.Pattern[str], str], ...]


def in_terms(text: str, terms: Terms) -> str:
    """`text` with each pattern of `terms` replaced in turn."""
    for pattern, repl in terms:
        text = pattern.sub(repl, text)
    return text


def telling_error(errs: list) -> dict:
    """Of a pydantic validation's errors (non-empty), the one that says what is wrong. A union field (stop: a string or
    a list of them) reports one error a branch, the branch that does not match the input's type first ("Input should
    be a valid string" for a list of 9 stop strings): the branch that matched says what is wrong."""
    first = errs[0]
    field = lambda err: [x for x in err.get("loc", ()) if x != "body"][:1]  # noqa: E731
    if first.get("type", "").endswith("_type"):
        first = next((err for err in errs[1:] if field(err) == field(first) and not err.get("type", "").endswith("_type")),
                     first)
    return first


def field_path(loc) -> list[str]:
    """An error location's parts that name fields: without the tags of union branches ('str', 'constrained-str',
    'list[str]'), which are no field's names."""
    return [str(x) for x in loc if not (isinstance(x, str) and ("[" in x or "-" in x or x in (
        "str", "int", "float", "bool", "list", "dict")))]


def json_kind(data: object) -> str:
    """What a JSON value is, in an error's words ("the request body must be a JSON object, not an array")."""
    return ("an array" if isinstance(data, list) else "null" if data is None else "a string" if isinstance(data, str)
            else "a boolean" if isinstance(data, bool) else "a number" if isinstance(data, (int, float)) else
            "an object")


def invalid_value(value: object, supported: tuple[str, ...], param: str) -> ServingError:
    """OpenAI's 400 for a value its API's enum does not have, as OpenAI words it ("Invalid value: 'x'. Supported
    values are: 'a', 'b', and 'c'.", code invalid_value, the field's path as `param`)."""
    said = (f"{supported[0]!r} and {supported[1]!r}" if len(supported) == 2
            else f"{', '.join(repr(s) for s in supported[:-1])}, and {supported[-1]!r}")
    return ServingError(400, f"Invalid value: {value!r}. Supported values are: {said}.", param=param,
                        code="invalid_value")
