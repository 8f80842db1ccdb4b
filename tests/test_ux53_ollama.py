"""Ollama requests' errors for options the OpenAI request they become refuses: named as the option sent."""

from __future__ import annotations

import pytest

from controller.api import ollama
from controller.api import protocol as p
from controller.errors import ServingError


@pytest.mark.parametrize(("stop", "said"), [
    ([""], "options.stop.0: String should have at least 1 character"),
    ([f"s{i}" for i in range(p.MAX_STOP + 1)], f"options.stop: List should have at most {p.MAX_STOP} items"),
])
def test_a_refused_stop_option_is_named_as_sent(stop, said):
    """`options.stop` of an empty string, or of too many, was "stop.constrained-str: Input should be a valid string"
    (pydantic's union branch tag, and the wrong branch's complaint about a list that is one)."""
    with pytest.raises(ServingError) as e:
        ollama._as(p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                             "stop": stop})
    assert e.value.status == 400 and e.value.message.startswith(said), e.value.message
    assert "constrained" not in e.value.message
