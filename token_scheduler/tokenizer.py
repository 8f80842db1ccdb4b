"""The tokenizer of a model directory, and a byte tokenizer for models without one (the paced kind's)."""

from __future__ import annotations

import importlib.util
import json
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


# AutoTokenizer's module imports AutoConfig's, which imports torch (transformers 5: its RoPE utilities, and the
# config's dtype made a torch.dtype): ~3 s of a controller's start-up on a 2-core host, which needs the tokenizer only.
# For a folder the engine serves, the class AutoTokenizer would make is chosen here, from the folder's two JSON files
# and these tables, and made directly (`auto_tokenizer_class`); anything else is left to AutoTokenizer.
# Per architecture: the class transformers registers for the model_type (its TOKENIZER_MAPPING_NAMES; None: none),
# and whether folders of that type are taken to name a wrong class, the registered one made instead (its
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS). Mistral's is MistralCommonBackend where mistral_common is installed
# (AutoTokenizer decides then). tests/test_ux62a_controller_no_torch.py holds these to transformers' own tables and
# the choice to AutoTokenizer's.
_REGISTERED: dict[str, tuple[str | None, bool]] = {
    "llama": (None, False), "qwen2": ("Qwen2Tokenizer", True), "qwen3": ("Qwen2Tokenizer", False),
    "mistral": ("TokenizersBackend", False)}
_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend", "BloomTokenizer", "BloomTokenizerFast")


class _AutoDecides(Exception):
    """The folder's tokenizer is one whose class only AutoTokenizer can tell."""


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _named_class(name: str) -> type:
    """The tokenizer class `name` names, as AutoTokenizer takes it (transformers' tokenizer_class_from_name; its
    generic classes are made as TokenizersBackend); _AutoDecides when transformers has no tokenizer of that name."""
    from tokenpool import imports

    if name in _GENERIC:
        return imports.transformers("TokenizersBackend")
    try:
        cls = imports.transformers(name)
    except AttributeError:
        if name.endswith("Fast"):  # (a folder saved before transformers 5: its XFast is X now)
            return _named_class(name.removesuffix("Fast"))
        raise _AutoDecides(name) from None
    base = imports.transformers("PreTrainedTokenizerBase")
    if not (isinstance(cls, type) and issubclass(cls, base) and cls.__module__.startswith("transformers.")):
        raise _AutoDecides(name)
    return imports.transformers("TokenizersBackend") if cls.__name__ in _GENERIC else cls


def auto_tokenizer_class(path: str | Path) -> type | None:
    """The class `AutoTokenizer.from_pretrained(path)` makes the folder's tokenizer with, chosen as it chooses for a
    local folder of an architecture in `_REGISTERED` that names its tokenizer's class and has a tokenizer.json, with
    no remote code; None for any other folder (AutoTokenizer decides)."""
    from tokenpool import imports

    p = Path(path)
    cfg, tok = _json(p / "config.json"), _json(p / "tokenizer_config.json")
    arch, named = cfg.get("model_type"), tok.get("tokenizer_class")
    if (not p.is_absolute()  # (AutoTokenizer matches a relative path against some Hub ids, which it loads otherwise)
            or arch not in _REGISTERED or not isinstance(named, str) or "auto_map" in cfg or "auto_map" in tok
            or not (p / "tokenizer.json").is_file()
            or arch == "mistral" and importlib.util.find_spec("mistral_common") is not None):
        return None
    registered, overridden = _REGISTERED[arch]
    try:
        backend = imports.transformers("TokenizersBackend")
        # AutoTokenizer's order: a LlamaTokenizer whose tokenizer.json is byte-level is loaded as it is; a named
        # class other than the one registered for the architecture is made if it is a model's own (the registered
        # one for an architecture in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), else TokenizersBackend; the named
        # class otherwise
        if (named.removesuffix("Fast") == "LlamaTokenizer" and not overridden
                and backend._tokenizer_json_has_byte_level(str(p))):
            return backend
        if registered is not None and registered.removesuffix("Fast") != named.removesuffix("Fast"):
            if registered in _GENERIC:
                return backend
            return _named_class(registered if overridden else named)
        return _named_class(named.removesuffix("Fast"))
    except _AutoDecides:
        return None


def load_tokenizer(path: str | Path | None):
    """The model directory's HF tokenizer, or ByteTokenizer when there is no directory. The class AutoTokenizer
    would make it with, made directly where `auto_tokenizer_class` can tell it: without torch in the process (the
    controller reads every model's tokenizer); AutoTokenizer otherwise."""
    if path is None:
        return ByteTokenizer()
    from tokenpool import imports

    cls = auto_tokenizer_class(path) or imports.transformers("AutoTokenizer")
    return cls.from_pretrained(str(path))
