"""Model names as Ollama reads them: one rule for the server's Ollama routes and for the CLI's `run`, `show`, `stop`
and `pull`, which ask the OpenAI and admin APIs (exact names, as vLLM's) and so said "model not found" for a name
`ollama run` takes against the same server (`TINY`, `library/tiny`). Standard library only: the CLI imports it.

Ollama's names are `[host/][namespace/]model[:tag]` (its types/model ParseName, `http://` or `https://` before them
dropped), `registry.ollama.ai`, `library` and `latest` where left out, and two names are one model where they are
equal ignoring the case of their ASCII letters (Name.EqualFold, over every part). A served name here is one string
with no tag, so an Ollama name means a served one as `pick` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

LATEST = ":latest"
# (Ollama's default host and namespace, as they may be written before a name: `library/NAME`, the registry's
# `registry.ollama.ai/library/NAME`; any other host or namespace is another model, as there)
HOME = ("registry.ollama.ai/library/", "library/")
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # (Ollama's: ASCII letters only)


def fold(name: str) -> str:
    return name.translate(_FOLD)


def spellings(name: str) -> list[str]:
    """The served names `name` may be, first to last: as sent, then without `:latest`; then the same without Ollama's
    own host and namespace (and a URL's scheme) where it is written with them (what is left a name with no `/`:
    `library/org/model` is another host's, as Ollama parses it; a served `org/model` is found by that name)."""
    rest = name.removeprefix("http://") if name.startswith("http://") else name.removeprefix("https://")
    home = next((h for h in HOME if fold(rest[:len(h)]) == h), "")
    rest = rest[len(home):]
    out = [name, rest] if rest != name and rest and "/" not in rest else [name]
    return [w for n in out for w in (n, n[:-len(LATEST)] if fold(n).endswith(LATEST) else None) if w]


def pick(name: str, known: Callable[[str], bool], usable: Callable[[], Iterable[str]]) -> str | None:
    """The served name Ollama name `name` means to a key: the first of its `spellings` that `known` says the key may
    ask for (a model's name, alias or adapter), else the one name of those (all of them: `usable`) equal to a
    spelling ignoring case, the spellings in the same order. Two such names, differing only in case, and none exact:
    neither (each is found by its exact name). None where no model is meant. The key's names only, on the server as
    in the CLI (which has the key's list, /v1/models): another key's model is never the pick, its name no more than
    a spelling of one of the key's."""
    wants = spellings(name)
    for want in wants:
        if known(want):
            return want
    names = list(usable())
    for want in wants:
        if len(hits := {n for n in names if fold(n) == fold(want)}) == 1:
            return hits.pop()
    return None
