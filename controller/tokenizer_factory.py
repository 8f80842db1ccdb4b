"""The tokenizer every factory-made model carries: a small byte-level BPE trained on Python's own text.

There is no model hub, so the tokenizer is built here. `train_tokenizer()` trains it on text that ships with
Python 3.11 (the prose of `pydoc_data/topics.py`, then the standard library's `.py` sources in sorted order
up to a fixed byte budget); the result is shipped as `controller/data/tokenizer.json` so it is identical on
every machine. Regenerate it with `python -m controller.tokenizer_factory` (the stdlib differs slightly
between Python patch releases, so a retrained file may differ from the shipped one).

Lossless by construction: byte-level pre-tokenisation over Qwen2's split pattern, no normaliser, no unknown
token, and `clean_up_tokenization_spaces=False`, so `decode(encode(s)) == s` for any text. BOS exists (for
configs and engines that want one) but, as with Qwen, is not prepended; prompts go through the ChatML chat
template, whose turns end with `<|im_end|>`. Generation stops at `<|im_end|>` or `<|endoftext|>`.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

TOKENIZER_JSON = Path(__file__).parent / "data" / "tokenizer.json"

ENDOFTEXT, IM_START, IM_END, BOS, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, BOS, PAD)  # appended after the BPE vocabulary, in this order
EOS_TOKENS = (IM_END, ENDOFTEXT)  # generation stops at either (Qwen's generation_config does the same)
VOCAB_SIZE = 4000  # BPE merges + 256 bytes + the special tokens
TRAIN_BYTES = 4_000_000

# Qwen2's pre-tokeniser split: contractions, letter runs with one leading non-letter, single digits, symbol
# runs, newlines, other whitespace. Every character falls in some piece, so nothing is dropped.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def training_text(budget: int = TRAIN_BYTES) -> Iterator[str]:
    """Deterministic corpus: the stdlib's reference prose, then sorted non-test stdlib sources, `budget` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    topics = stdlib / "pydoc_data" / "topics.py"
    skip = {"site-packages", "test", "tests", "idle_test"}
    sources = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts) and p != topics)
    left = budget
    for path in (topics, *sources):
        if left <= 0:
            return
        text = path.read_bytes()[:left].decode("utf-8", errors="ignore")
        left -= len(text.encode())
        yield text


def train_tokenizer(budget: int = TRAIN_BYTES, vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE (a `tokenizers.Tokenizer`) on `training_text(budget)`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, whatever the corpus holds
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(training_text(budget), trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(tokenizer_json: Path = TOKENIZER_JSON):
    """The shipped tokenizer as a `PreTrainedTokenizerFast`, with its special tokens and chat template."""
    from tokenpool import imports

    PreTrainedTokenizerFast = imports.transformers("PreTrainedTokenizerFast")  # noqa: N806 (transformers' name)

    if not tokenizer_json.exists():
        raise FileNotFoundError(f"{tokenizer_json} is missing; run `python -m controller.tokenizer_factory`")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode must not touch spaces around punctuation
    )


def save_tokenizer(out: str | Path) -> Path:
    """Write the tokenizer files into `out` (loadable with `AutoTokenizer.from_pretrained(out)`)."""
    out = Path(out)
    build_tokenizer().save_pretrained(str(out))
    return out


if __name__ == "__main__":
    TOKENIZER_JSON.parent.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(TOKENIZER_JSON), pretty=True)
    print(f"wrote {TOKENIZER_JSON}")
