"""The serving layer's stream code without a server: a scripted generation (the surface a stream reads: `events`,
`pending`, `close` and the token counts) over given text pieces, and a bare OpenAIServing to run the streams on."""

from __future__ import annotations


def bare_serving():
    """An OpenAIServing with no engine behind it (its stream methods read only the generation given them)."""
    from controller.api.serving import OpenAIServing

    s = OpenAIServing.__new__(OpenAIServing)
    s.active = set()
    return s


def generation(deltas: list[tuple[str, bool]]):
    """A generation of one choice whose engine deltas are `deltas` ((text, finished) each; the finished one `stop`)."""
    from controller.messages import Delta

    class Gen:
        subs, prompt_tokens, completion_tokens, cached_tokens = [0], 3, len(deltas), 0
        prompt_only = False  # (a reply not streamed reads it for its usage)

        async def events(self):
            for text, finished in deltas:
                yield 0, Delta("r", text=text, finished=finished, finish_reason="stop" if finished else None)

        def pending(self):
            return False

        def close(self, status):
            pass

    return Gen()


def in_pieces(text: str, n: int = 3) -> list[tuple[str, bool]]:
    """`text` as deltas of `n` characters, the last one finished."""
    pieces = [text[k:k + n] for k in range(0, len(text), n)]
    return [(piece, k == len(pieces) - 1) for k, piece in enumerate(pieces)]


def two_hermes_calls() -> str:
    """Two calls in the hermes syntax, the first with a quote and a brace inside a string: get_weather, then put."""
    from controller.api.structured import HERMES_CLOSE, HERMES_OPEN

    return (HERMES_OPEN + '{"name": "get_weather", "arguments": {"city": "Par\\"is}"}}' + HERMES_CLOSE + "\n" +
            HERMES_OPEN + '{"name": "put", "arguments": {"xs": [1, 2, 3]}}' + HERMES_CLOSE)
