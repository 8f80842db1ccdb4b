"""The shipped byte-level BPE: lossless on any text, special tokens, ChatML template, save/load, retraining."""

from __future__ import annotations

import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from controller import tokenizer_factory as tf


@pytest.fixture(scope="module")
def tok():
    return tf.build_tokenizer()


@settings(max_examples=400, deadline=None)
@given(st.text())
@example("family 👨‍👩‍👧‍👦, flag 🇯🇵, skin 👍🏽")
@example("中文字符 日本語のテキスト 한국어 텍스트")
@example("e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 \u200b\u200d\ufeff")
@example("\x00\x01\x02\x7f\x1b[0m\r\n\t\x0b\x0c  \n\n   trailing   ")
@example("<|im_start|>user\nhi<|im_end|> <|endoftext|><|pad|><|begin_of_text|><|im_end")
@example("  leading spaces and 12345678901234567890 digits, 'quotes' \"double\" don't")
def test_decode_encode_is_lossless(tok, s):
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s
    assert tok.encode(s) == ids  # nothing (no BOS) is prepended


def test_special_tokens(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in tf.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(tf.SPECIAL_TOKENS)
    assert sorted(ids.values()) == list(range(len(tok) - len(tf.SPECIAL_TOKENS), len(tok)))  # after the BPE vocab
    assert len(tok) == tf.VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (tf.BOS, tf.IM_END, tf.PAD, None)
    for t, i in ids.items():
        assert tok.encode(t) == [i]
        assert tok.decode([i], skip_special_tokens=True) == ""


def test_chat_template(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(conv, tokenize=False).endswith("assistant\n")
    ids = tok.encode(text)
    assert ids.count(tok.convert_tokens_to_ids(tf.IM_START)) == 5
    assert ids.count(tok.convert_tokens_to_ids(tf.IM_END)) == 4


def test_save_and_autotokenizer(tmp_path, tok):
    from transformers import AutoTokenizer

    tf.save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x ** 2  # 平方 🙂\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    conv = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (tf.IM_END, tf.PAD, tf.BOS)


def test_train_small_budget_is_byte_level():
    t = tf.train_tokenizer(budget=200_000, vocab_size=600)
    assert t.get_vocab_size() == 600
    assert t.token_to_id(tf.SPECIAL_TOKENS[-1]) == 599
    s = "naïve café — 東京 🙂\x00"
    assert t.decode(t.encode(s).ids, skip_special_tokens=False) == s


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the shipped file was trained on Python 3.11.7's stdlib")
def test_shipped_tokenizer_is_reproducible():
    import json

    shipped = json.loads(tf.TOKENIZER_JSON.read_text())["model"]
    retrained = json.loads(tf.train_tokenizer().to_str())["model"]
    assert retrained["vocab"] == shipped["vocab"]
    assert retrained["merges"] == shipped["merges"]


def test_detokenizer_honours_each_requests_skip_special_tokens(tok):
    from token_scheduler.detokenizer import IncrementalDetokenizer

    ids = tok.encode("Hi " + tf.IM_END + " there", add_special_tokens=False)
    out = {}
    for skip in (True, False):
        det, text = IncrementalDetokenizer(tok, skip_special_tokens=skip), ""
        for n in range(1, len(ids) + 1):  # one token per step, as the engine feeds it
            text += det.step(ids, n, n == len(ids))
        out[skip] = text
    assert out[False] == "Hi " + tf.IM_END + " there"
    assert out[True] == tok.decode(ids, skip_special_tokens=True) and tf.IM_END not in out[True]
