"""A worker stopped while its warm-up still imports (a first run's Ctrl-C, as test_ux63c_first_run's stop meets it
at times): the imports fail as the process ends (transformers half imported: "'prims' object has no attribute
'view_of'"), which was logged as an ERROR with its traceback after the worker's own "stopping". A warm-up that fails
once the worker stops is said at DEBUG; one that fails while it runs is still an ERROR with its traceback."""

from __future__ import annotations

import logging

import pytest

from controller import worker


def _broken(device: str) -> None:
    raise AttributeError("'_OpNamespace' 'prims' object has no attribute 'view_of'")


@pytest.fixture
def stopping(monkeypatch):
    monkeypatch.setattr(worker, "warm_up", _broken)
    monkeypatch.setattr(worker, "_stopping", type(worker._stopping)())
    return worker._stopping


def test_a_warm_up_cut_by_the_stop_is_no_error(stopping, caplog):
    stopping.set()
    with caplog.at_level(logging.DEBUG, logger=worker.log.name):
        worker._warm_up("cpu", 0.0, "cold start")
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert "cut short by the worker's stop" in caplog.text


def test_a_warm_up_that_fails_while_the_worker_runs_is_an_error(stopping, caplog):
    with caplog.at_level(logging.DEBUG, logger=worker.log.name):
        worker._warm_up("cpu", 0.0, "cold start")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and "warm-up failed" in errors[0].getMessage()
