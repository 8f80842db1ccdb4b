"""A text prompt's ids as vLLM and Ollama encode them: with the special tokens its tokenizer adds (a Llama 3,
Mistral or Gemma tokenizer's BOS); a chat template writes its own."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from controller.api import protocol as p
from controller.api.serving import OpenAIServing, PromptTooLong, encode, encode_prompt, special_affixes


@pytest.fixture(scope="module")
def bos_tokenizer(make_tiny, tmp_path_factory):
    """The factory model's tokenizer made to add BOS to a text it encodes, as Llama 3's does (its tokenizer.json's
    post-processor), with a chat template that writes it (as Llama 3's does)."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from controller.tokenizer_factory import BOS

    dst = tmp_path_factory.mktemp("bos") / "tok"
    shutil.copytree(make_tiny("qwen2"), dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tpl = dst / "chat_template.jinja"
    if tpl.exists():
        tpl.write_text("{{ bos_token }}" + tpl.read_text())
    else:
        cfg["chat_template"] = "{{ bos_token }}" + cfg["chat_template"]
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return AutoTokenizer.from_pretrained(dst), tok.token_to_id(BOS)


def test_a_completions_prompt_gets_the_bos_its_tokenizer_adds(bos_tokenizer, make_tiny):
    """A completion's text prompt (and /tokenize's, Ollama's raw one: `encode_prompt`) starts with the BOS its
    tokenizer adds, as vLLM (add_special_tokens, true there) and Ollama's runner encode it; it was left out, so a
    Llama saw prompts unlike its training's. The limit counts it; add_special_tokens false leaves it out; a tokenizer
    that adds none (Qwen's) is unchanged; the chat template's BOS is not doubled."""
    from transformers import AutoTokenizer

    tok, bos = bos_tokenizer
    plain = encode(tok, "Hello world")
    assert special_affixes(tok) == ([bos], []) and encode_prompt(tok, "Hello world") == [bos, *plain]
    assert encode_prompt(tok, "Hello world", special=False) == plain
    with pytest.raises(PromptTooLong) as ei:
        encode_prompt(tok, "Hello world", limit=len(plain) + 1)
    assert ei.value.n == len(plain) + 1
    me = SimpleNamespace(tokenizer=tok, max_model_len=64)
    req = p.CompletionRequest.model_validate({"model": "m", "prompt": ["Hello world", "Hi"], "echo": True})
    texts, prompts, echo = OpenAIServing.__new__(OpenAIServing)._completion_prompts(me, req)  # type: ignore[arg-type]
    assert prompts == [[bos, *plain], [bos, *encode(tok, "Hi")]] and echo == ["Hello world", "Hi"]
    qwen = AutoTokenizer.from_pretrained(make_tiny("qwen2"))
    assert special_affixes(qwen) == ([], []) and encode_prompt(qwen, "Hello world") == encode(qwen, "Hello world")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = encode(tok, chat)  # (as _chat_prompt feeds a chat: the template's text, nothing added)
    assert ids[0] == bos and ids[1] != bos


def test_add_special_tokens_false_and_embedding_inputs(bos_tokenizer):
    """vLLM's `add_special_tokens` on a completion (and /tokenize) is taken: false leaves the BOS out (the field was
    unknown to the request model, so a client could not turn it off). An input to embed is encoded as vLLM's
    embeddings encode it, with the special tokens its tokenizer adds (last-token pooling models need their EOS)."""
    from controller.api.embeddings import prompts_of

    tok, bos = bos_tokenizer
    plain = encode(tok, "Hello world")
    me = SimpleNamespace(tokenizer=tok, max_model_len=64)
    req = p.CompletionRequest.model_validate({"model": "m", "prompt": "Hello world", "add_special_tokens": False})
    _, prompts, _ = OpenAIServing.__new__(OpenAIServing)._completion_prompts(me, req)  # type: ignore[arg-type]
    assert prompts == [plain]
    assert not p.TokenizeRequest.model_validate({"model": "m", "prompt": "x", "add_special_tokens": False}
                                                ).add_special_tokens
    me.tokenizer, me.name = tok, "m"
    serving = OpenAIServing.__new__(OpenAIServing)
    serving._check_ids = lambda me, ids, param: ids  # (the vocabulary's bounds: not what is tested here)
    assert prompts_of(serving, me, ["Hello world"], None) == [[bos, *plain]]
