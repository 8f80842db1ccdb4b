"""Incremental detokenization and stop strings.

Text is released only once the decoded bytes form whole UTF-8 characters (a trailing U+FFFD means a
character is still split across tokens), and, while a request has stop strings, the last
`len(longest stop) - 1` characters are held back so a stop string is never streamed before it is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DetokState:
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all decoded text so far (complete characters)
    sent: int = 0  # characters of `text` already handed out
    stop_hit: str | None = None
    extra: dict = field(default_factory=dict)


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def _decode(self, ids: list[int], skip: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    def step(self, st: DetokState, ids: list[int], stop: list[str], finished: bool, skip_special_tokens: bool = True
             ) -> str:
        """Consume output ids (cumulative); return the text newly released. Sets st.stop_hit on a stop string.
        `skip_special_tokens`: the request's own (SamplingParams), as vLLM and HF decode it."""
        prefix = self._decode(ids[st.prefix_offset : st.read_offset], skip_special_tokens)
        full = self._decode(ids[st.prefix_offset :], skip_special_tokens)
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            st.text += full[len(prefix) :]
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)
        if stop:
            # search only where a new match can start
            start = max(0, st.sent - max(len(s) for s in stop) + 1)
            hits = [(i, s) for s in stop if (i := st.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                st.text, st.stop_hit = st.text[:i], s
                finished = True
        hold = 0 if finished or not stop else max(len(s) for s in stop) - 1
        upto = max(st.sent, len(st.text) - hold)
        delta = st.text[st.sent : upto]
        st.sent = upto
        return delta
