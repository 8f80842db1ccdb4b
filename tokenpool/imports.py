"""First imports of torch and transformers, one thread at a time, in any process of tokenpool.

Neither is safe to import on two threads at once. transformers' lazy module, imported first on one thread while
another asked it for a name, answered "cannot import name 'AutoTokenizer' from 'transformers'" every time (two
threads: one reading a model's config, AutoConfig, one loading its tokenizer, AutoTokenizer; a controller adding a
model, a worker hosting one). torch's operators registered by one thread's import while another's used them failed
a worker's load ("operator _native::_foreach_mm_native_0 does not exist"). Every first import of either goes
through `LOCK`; a second thread waits for it, then finds the module whole. Re-entrant: a caller under it may import
through it again (controller.hosting's torch, then the engine's modules)."""

from __future__ import annotations

import threading
from typing import Any

LOCK = threading.RLock()


def transformers(*names: str) -> Any:
    """transformers' `names` (`AutoTokenizer`, `AutoConfig`, ...), each resolved under `LOCK`: the lazy module makes a
    name's submodule on its first use, which is the import to keep apart. One name: it; several: their tuple."""
    with LOCK:
        import transformers as t

        got = tuple(getattr(t, n) for n in names)
    return got[0] if len(got) == 1 else got
