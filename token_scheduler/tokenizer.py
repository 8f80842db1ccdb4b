"""The tokenizer of a model directory, and a byte tokenizer for models without one (the paced kind's)."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """Bytes as tokens (ids 3..258); 0 pad, 1 bos, 2 eos. Enough of the HF tokenizer API for the server."""

    eos_token_id = 2
    bos_token_id = 1
    pad_token_id = 0
    vocab_size = 259
    chat_template = "bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True,
                            **_: object) -> str | list[int]:
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text


def load_tokenizer(path: str | Path | None):
    """The model directory's HF tokenizer, or ByteTokenizer when there is no directory."""
    if path is None:
        return ByteTokenizer()
    from tokenpool import imports

    return imports.transformers("AutoTokenizer").from_pretrained(str(path))
