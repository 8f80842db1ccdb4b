"""The controller reads a model's tokenizer without importing torch (ux62a).

It read every model's tokenizer through AutoTokenizer, whose module imports AutoConfig's, and torch with it
(transformers 5): ~3 s of import and ~1.4 s more per server start on a 2-core host, which the models' registration
waited for, beside the local worker's own imports. `load_tokenizer` now makes the class AutoTokenizer would make,
chosen from the folder's JSON files (`auto_tokenizer_class`), and `local_devices` asks torch for the GPUs only where a
GPU driver is. Here: a live `tokenpool serve MODEL_DIR` registers the model, answers /tokenize and a chat request
through the official client with the ids AutoTokenizer gives, and torch is not in the controller's process (its
memory maps: no library of torch's loaded); and over a matrix of architectures, named classes and tokenizer kinds the
class chosen is AutoTokenizer's, or none (AutoTokenizer then decides), with the same ids and chat text."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from controller.pool import GPU_DRIVER_NODES
from load_tests.live_server import LiveServer
from token_scheduler.tokenizer import _REGISTERED, auto_tokenizer_class, load_tokenizer
from tokenpool.models import SUPPORTED_ARCHS

TEXT = "Hello  world <|im_start|> 123 ünïcödé\n\tend"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi ünï"}]


def _torch_libraries(pid: int) -> list[str]:
    """The files of torch's package mapped into process `pid` (an `import torch` loads its C extension and
    libtorch*.so; a process that never imported it maps none)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({ln.split()[-1] for ln in lines if "/torch/" in ln or "libtorch" in ln})


def test_a_served_model_is_registered_and_tokenized_without_torch_in_the_controller(make_tiny, tmp_path):
    from transformers import AutoTokenizer

    model = make_tiny("qwen2")  # (the factory's folder names TokenizersBackend; AutoTokenizer makes Qwen2Tokenizer)
    ref = AutoTokenizer.from_pretrained(model)
    chat = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    if any(Path(n).exists() for n in GPU_DRIVER_NODES):  # (a GPU host: torch asked where NVML cannot count them)
        server = LiveServer({"models": [{"name": "tiny", "path": str(model)}],
                             "workers": {"local": "cpu", "standby": False}}, tmp_path / "s")
    else:  # `tokenpool serve MODEL_DIR`, as a user starts it
        server = LiveServer(None, tmp_path / "s", args=[str(model), "--served-model-name", "tiny"])
    with server as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(ref(chat, add_special_tokens=False)["input_ids"])
        got = httpx.post(srv.url + "/tokenize", json={"model": "tiny", "prompt": TEXT}, timeout=30).json()
        assert got["tokens"] == ref(TEXT)["input_ids"], got
        got = httpx.post(srv.url + "/tokenize", json={"model": "tiny", "messages": MESSAGES}, timeout=30).json()
        assert got["tokens"] == ref(chat, add_special_tokens=False)["input_ids"], got
        # (the worker, a process of its own, imports torch; the controller, the server's process, must not have)
        assert _torch_libraries(srv.proc.pid) == [], srv.log()


def test_the_tables_are_transformers_own():
    """`_REGISTERED` is what transformers registers for each architecture the engine runs, and whether it overrides
    the class a folder names; an architecture added to the engine is added there too (else its models' tokenizers
    go through AutoTokenizer, torch with it)."""
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    assert set(SUPPORTED_ARCHS) <= set(_REGISTERED)
    for arch, want in _REGISTERED.items():
        if arch == "mistral" and importlib.util.find_spec("mistral_common") is not None:
            continue  # (MistralCommonBackend registered: auto_tokenizer_class leaves mistral to AutoTokenizer)
        assert (TOKENIZER_MAPPING_NAMES.get(arch), arch in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) == want, arch


def _metaspace_tokenizer(out: Path) -> None:
    """A SentencePiece-like BPE tokenizer.json (Metaspace, not byte-level: a Llama 2's or Mistral's kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["Hello world, this is a tokenizer.", "Say hi to everyone", "numbers 123 456", "ünïcödé end"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(out / "tokenizer.json"))


NAMES = ["TokenizersBackend", "PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast", "GPT2Tokenizer",
         "LlamaTokenizer", "LlamaTokenizerFast", "NoSuchTokenizer"]


def test_the_class_chosen_is_autotokenizers(make_tiny, tmp_path):
    """For each architecture, named class and tokenizer kind, `auto_tokenizer_class` says AutoTokenizer's class (or
    None, AutoTokenizer then deciding: only for a name transformers does not know), and `load_tokenizer`'s tokenizer
    gives AutoTokenizer's ids and chat text."""
    from transformers import AutoTokenizer

    src = make_tiny("qwen2")
    cfg = json.loads((src / "config.json").read_text())
    wrong, undecided = [], []
    for kind in ("byte-level", "metaspace"):
        for arch in _REGISTERED:
            for name in NAMES:
                d = tmp_path / f"{kind}-{arch}-{name}"
                shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
                if kind == "metaspace":
                    _metaspace_tokenizer(d)
                (d / "config.json").write_text(json.dumps({**cfg, "model_type": arch}))
                tc = json.loads((d / "tokenizer_config.json").read_text())
                (d / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": name}))
                chosen = auto_tokenizer_class(d)
                ref = AutoTokenizer.from_pretrained(d)
                if chosen is None:
                    undecided.append(d.name)
                elif chosen is not type(ref):
                    wrong.append((d.name, chosen.__name__, type(ref).__name__))
                    continue
                tok = load_tokenizer(d)
                assert type(tok) is type(ref), d.name
                assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"], d.name
                assert tok.decode(ref(TEXT)["input_ids"]) == ref.decode(ref(TEXT)["input_ids"]), d.name
                assert (tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
                        == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)), d.name
                assert (tok.eos_token_id, tok.bos_token_id, tok.all_special_ids) == (
                    ref.eos_token_id, ref.bos_token_id, ref.all_special_ids), d.name
    assert wrong == [], wrong
    assert all(u.endswith("-NoSuchTokenizer") for u in undecided), undecided


@pytest.mark.parametrize("change", ["relative", "auto_map", "no_class", "no_tokenizer_json", "arch"])
def test_other_folders_are_left_to_autotokenizer(make_tiny, tmp_path, monkeypatch, change):
    """Where AutoTokenizer's choice takes more than the folder's JSON files (remote code, an architecture the engine
    does not run, a relative path AutoTokenizer matches against Hub ids, no tokenizer.json to load as it is), it
    decides."""
    d = tmp_path / "m"
    shutil.copytree(make_tiny("qwen2"), d, ignore=shutil.ignore_patterns("*.safetensors"))
    tc, cfg = json.loads((d / "tokenizer_config.json").read_text()), json.loads((d / "config.json").read_text())
    assert auto_tokenizer_class(d) is not None
    if change == "relative":
        monkeypatch.chdir(tmp_path)
        d = Path("m")
    elif change == "auto_map":
        (d / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    elif change == "no_class":
        (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tc.items() if k != "tokenizer_class"}))
    elif change == "no_tokenizer_json":
        (d / "tokenizer.json").unlink()
    else:
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert auto_tokenizer_class(d) is None
