"""`/set parameter NAME VALUE` in a `tokenpool run` conversation refuses a value past what the server takes, naming
its range: `/set parameter temperature 5` was taken, and every message after it refused by the server ("error:
temperature: Input should be less than or equal to 2") until the user found the /set to undo."""

from __future__ import annotations

import pytest

from tests.test_ux52_chat_commands import converse, stub  # noqa: F401 - (stub: the fixture)


@pytest.mark.parametrize("name,value,says", [
    ("temperature", "5", "temperature is 0 to 2"), ("temperature", "-0.1", "temperature is 0 to 2"),
    ("top_p", "0", "top_p is more than 0, up to 1"), ("top_k", "-2", "top_k is -1 (off) or 0 to 1048576"),
    ("min_p", "1.5", "min_p is 0 to 1"), ("repeat_penalty", "0", "repeat_penalty is more than 0, up to 10"),
])
def test_a_value_the_server_refuses_is_refused_at_set(stub, name, value, says):  # noqa: F811
    out, (body,) = converse(stub, f"/set parameter {name} {value}\nhi\n")
    assert f"Couldn't set parameter: {says} here" in out, out
    assert "repetition_penalty" not in body and name not in body


def test_values_in_range_are_set(stub):  # noqa: F811
    out, (body,) = converse(stub, "/set parameter temperature 2\n/set parameter top_k -1\n/set parameter top_p 1\nhi\n")
    assert "Couldn't" not in out and body["temperature"] == 2 and body["top_k"] == -1 and body["top_p"] == 1
