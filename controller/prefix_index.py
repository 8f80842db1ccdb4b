"""Which prompt prefixes each engine has likely cached, as the controller last sent them (llm-d's approximate
prefix-cache-aware scorer): routing prefers the engine that would start a request on cached KV, and admission
estimates its prefill from the tokens left to compute.

The index is the controller's own guess: the engines' prefix caches evict as their KV fills (what is sent here and
later evicted there still reads as cached), and a pooled engine's block size is its own; the index counts blocks of
BLOCK tokens. Each (model, engine) keeps its most recently sent MAX_BLOCKS block hashes. Hashes chain, as the
engines' do (`token_scheduler.block_manager.block_hash`), and carry the LoRA adapter and the cache salt.
"""

from __future__ import annotations

from collections import OrderedDict

from token_scheduler.block_manager import chain_hashes

BLOCK = 16
MAX_BLOCKS = 1 << 12  # per (model, engine): 65,536 tokens of prompts remembered (under 1 MB)


def prompt_hashes(ids: list[int], extra: bytes = b"") -> list[bytes]:
    """The chained hashes of a prompt's full blocks but the one holding its last token (which an engine computes)."""
    return chain_hashes([], ids, (len(ids) - 1) // BLOCK, BLOCK, extra)


class PrefixIndex:
    def __init__(self, max_blocks: int = MAX_BLOCKS):
        self.max_blocks = max_blocks
        self._seen: dict[tuple[str, str], OrderedDict[bytes, None]] = {}  # (model, engine) -> hashes, LRU first

    def cached_tokens(self, model: str, engine_id: str, hashes: list[bytes]) -> int:
        """Tokens of the longest run of `hashes` from the first that were sent to `engine_id` for `model`."""
        seen = self._seen.get((model, engine_id))
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n * BLOCK

    def sent(self, model: str, engine_id: str, hashes: list[bytes]) -> None:
        """A request with these prompt blocks went to `engine_id`: they are the most recent there."""
        if not hashes:
            return
        seen = self._seen.setdefault((model, engine_id), OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def forget(self, model: str | None = None, engine_id: str | None = None) -> None:
        """Drop what is known of a model (unregistered) or of an engine (dead, restarted), or both."""
        for k in [k for k in self._seen if (model is None or k[0] == model) and (engine_id is None or k[1] == engine_id)]:
            del self._seen[k]
