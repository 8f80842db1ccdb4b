"""What the operator keeps of a GPUPool in its memo, read by the tests of its forgetting a deleted pool
(tests/test_ux59a_operator_pool_memo.py, tests/test_ux60f_operator_pool_round_after_delete.py)."""

from __future__ import annotations

KEPT = {"applied", "locks", "seen", "pool_engines_seen"}  # (what the operator keeps of a pool it reconciled)
TABLES = (*KEPT, "served", "key_claims", "tenant_models_seen")  # (the memo's tables by uid)
# The handlers' own tables by uid, outside the memo: its events' memory and the status it last wrote
MODULE_TABLES = ("_WARNED", "_TOLD_READY", "_POSTED", "_UNTOLD", "_STATUS")


class MemoReader:
    """The operator's memo as its handlers get it (`handlers._lock`, spied through `monkeypatch`: its tables are the
    startup's, shared by every handler), and what it holds of a pool."""

    def __init__(self, monkeypatch) -> None:
        from controller.operator import handlers

        self.handlers, self.memo = handlers, None
        real_lock = handlers._lock

        def spy(memo, uid):
            self.memo = memo
            return real_lock(memo, uid)

        monkeypatch.setattr(handlers, "_lock", spy)

    def held(self, uid: str) -> set[str]:
        """The tables holding the pool `uid`: the memo's, and the handlers' own (`MODULE_TABLES`: "_WARNED" where its
        Warning is remembered, "_STATUS" where the status last written to it is kept...). None once it is forgotten."""
        memo = self.memo
        assert memo is not None, "no handler has taken a pool's lock yet: the memo is not seen"
        with memo.locks_guard:
            out = {t for t in TABLES if uid in (memo.get(t) or {})}
        with self.handlers._WARNED_LOCK:
            return out | {t for t in MODULE_TABLES if uid in getattr(self.handlers, t)}
