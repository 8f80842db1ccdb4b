"""A new user's pass over ux62's changes (helper-124): `tokenpool serve`'s embedded default from a fresh venv and
cache, then the official openai, anthropic and ollama clients, the CLI and the dashboard in Chromium. What it found,
each through the client where users meet it, on a live server of the real SmolLM2:

- chat completions' new 400 for unanswered tool calls (1d2f22b) refused an assistant message whose call has an
  empty id (`"id": ""`, as some servers and client adapters write a call the model gave no id), with "The following
  tool_call_ids did not have response messages: " naming nothing: such a call can have no answer (a tool message
  needs a non-empty tool_call_id, a 400 of its own), so the conversation could not go on at all. A call with no id
  was already left alone; an empty one is no id either, as before 1d2f22b;
- a first run stopped while it made its models (Ctrl-C during the ~10 s conversion, or the conversion failing) after
  its local worker had connected (11f4099: the workers start beside the making, their registration held until it is
  done) ended with asyncio's "Exception in callback StreamReaderProtocol.connection_made.<locals>.callback ...
  CancelledError" traceback on the terminal: the held connection's task was still waiting when the loop closed, and
  Python 3.11's asyncio reads a cancelled connection task's exception as an error.
"""

from __future__ import annotations

import logging
import threading

import openai
import pytest

from controller import shutdown
from controller.config import ModelSpec, ServerConfig
from controller.pool import EnginePool
from tests.ports import free_port, live_server_on

PORTS = range(28200, 28300)
ASK = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def oai(smollm2, tmp_path_factory) -> openai.OpenAI:
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "smol", "path": str(smollm2)}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux62k")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _call(call_id: str | None) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("call_id", ["", None])
def test_a_call_with_an_empty_or_no_id_is_not_an_unanswered_call(oai, call_id):
    """A history another server wrote (its calls' ids empty), the result then given as the user's text: taken, as a
    call of no id is (there is no id a tool message could answer)."""
    r = oai.chat.completions.create(model="smol", max_tokens=5, temperature=0, messages=[
        ASK, {"role": "assistant", "content": None, "tool_calls": [_call(call_id)]},
        {"role": "user", "content": "The tool said: sunny, 22C. Summarise."}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def test_unanswered_calls_with_ids_are_still_a_400_naming_them(oai):
    """Beside an empty id, a call's real id left unanswered is still the 400, naming it alone."""
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="smol", max_tokens=5, messages=[
            ASK, {"role": "assistant", "content": None, "tool_calls": [_call(""), _call("call_b")]},
            {"role": "user", "content": "go on"}])
    assert e.value.body["param"] == "messages.1.tool_calls"
    assert e.value.body["message"].endswith("did not have response messages: call_b"), e.value.body


def test_a_start_up_stopped_while_its_worker_waits_to_join_ends_without_a_traceback(tmp_path, monkeypatch, caplog):
    """`shutdown.run` with a `prepare` (the default's first run making its models) that fails once the local worker
    has connected, its registration held: the server says why and exits 2, and no task is left to be cancelled at
    the loop's close (asyncio's "Exception in callback ... CancelledError" traceback, logged by its `asyncio`
    logger; a Ctrl-C at that moment took the same way out)."""
    monkeypatch.setenv("TOKENPOOL_SHM_DIR", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    cfg = ServerConfig(listen={"host": "127.0.0.1", "port": free_port(PORTS)},
                       workers={"local": "cpu", "standby": False},
                       models=[ModelSpec(name="m", path=str(tmp_path / "never-made"))])
    connected = threading.Event()
    admit = EnginePool._admit

    def _admit(self, reg, peer):  # a worker's Register has arrived: its registration is held from here
        connected.set()
        return admit(self, reg, peer)

    monkeypatch.setattr(EnginePool, "_admit", _admit)

    def prepare() -> None:
        assert connected.wait(60), "no worker connected while the models were made"
        raise OSError(28, "No space left on device")  # (the conversion's, as a full disk fails it)

    caplog.set_level(logging.ERROR)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(shutdown.run(cfg, prepare)), daemon=True)
    t.start()
    t.join(90)
    assert rc == [2]
    assert any("No space left on device" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
