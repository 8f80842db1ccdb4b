"""The fault and load suite (load_tests/faults.py, `tokenpool suite ...`) run short against live paced servers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from load_tests import faults


@pytest.fixture(scope="module")
def suite_cache(tmp_path_factory):
    """TOKENPOOL_CACHE for the parts that make their three tiny models there: made once for the module (~2 s)."""
    return tmp_path_factory.mktemp("suite-cache")


@pytest.fixture(scope="module")
def paced():
    with faults.target(pace_s=0.01, max_num_seqs=16, ttft_s=0.5) as t:
        yield t


def test_corpus_every_case_as_expected(paced):
    r = faults.run_corpus(paced)
    wrong = [x for x in r["results"] if not x["ok"]]
    assert r["cases"] >= 35 and not wrong, wrong
    assert r["server_errors"] == 0 and r["errors_not_openai_json"] == 0


def test_fuzz_short():
    # its own server, paced 20x faster and with a 512-token context: two generated requests leave max_tokens out,
    # so they run to the context's end (4096 tokens were 40 s each at `paced`'s 0.01 s a token; 4-8 s each here on a
    # loaded machine at 4096); the same cases, limits and checks
    with faults.target(pace_s=0.0005, max_num_seqs=16, ttft_s=0.5, max_model_len=512) as fast:
        r = faults.run_fuzz(fast, examples=2)
    assert set(r["runs"]) == {"credentials", "anonymous"}
    assert r["runs"]["credentials"]["requests"] > 10 and r["runs"]["anonymous"]["requests"] > 10
    assert r["runs"]["anonymous"]["statuses"].get("401", 0) > 0  # without a key the API refuses
    assert r["server_errors"] == 0 and r["findings_total"] == 0, r


def test_disconnect_storm_frees_everything(paced):
    r = faults.run_disconnects(paced, streams=12, max_tokens=3000)
    assert r["streaming_when_dropped"] == 12 and r["held_at_peak"]["running"] == 12
    assert r["back_to_zero_s"] is not None and r["back_to_zero_s"] < 2.0, r
    assert not any(r["held_after"].values()) and r["request_after_ok"]


def test_overload_is_refused_with_retry_after(paced):
    r = faults.run_overload(paced, factor=5, duration=2.0, max_tokens=50, max_num_seqs=16, pace_s=0.01,
                            slo_ttft_s=0.5)
    assert r["requests"] > 100 and r["server_errors"] == 0 and r["accepted_failed_mid_stream"] == 0
    assert r["rejected_429"] > 0 and r["rejected_429_with_retry_after"] == r["rejected_429"]
    assert r["rejected_429_openai_json"] == r["rejected_429"]
    assert r["accepted_ok"] > 0 and r["ttft_accepted_s"]["p50"] <= 1.0


def test_soak_short_tracks_rss(paced):
    r = faults.run_soak(paced, duration=3.0, concurrency=4, max_tokens=10, sample_s=0.5)
    assert r["errors"] == 0 and r["requests_ok"] > 10
    assert r["controller_rss_start_mb"] > 10 and r["workers_rss_start_mb"] > 10
    assert len(r["samples"]) >= 4 and r["held_after_s"] is not None


@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_worker_killed_mid_stream(sig):
    with faults.target(pace_s=0.01, max_num_seqs=2, ttft_s=60.0) as t:
        r = faults.run_kill(t, sig, streams=2, queued=1, max_tokens=2000)
    assert r["running_streams_ended_with_error_event"] == 2 and r["running_streams_cut_without_done"] == 0
    assert r["error_event_s"]["max"] < (0.5 if sig == "KILL" else 4.0), r
    assert r["queued_requests_completed"] == 1, r  # never started: retried on the restarted worker
    assert r["restart_s"] is not None and r["request_after_restart_ok"]
    assert not r["victim_process_left"] and not r["dev_shm_files_leaked"]


def test_block_health_answers_while_tokenizing(tiny_model):
    with faults.target(config=faults.tokenizer_config(str(tiny_model)), model="tiny") as t:
        r = faults.run_block(t, prompt_mb=1.0)
    one = r["one_prompt"]
    assert one["request_status"] == 400 and one["health_probes"] >= 5, one  # 1 MB: too long for 128K
    assert one["health_latency_s"]["p50"] < 0.05, one


def test_suite_command_writes_json_with_provenance(paced, tmp_path):
    from controller.cli_suite import suite_app

    out = tmp_path / "corpus.json"
    res = CliRunner().invoke(suite_app, ["corpus", "--url", paced.url, "--admin-token", paced.admin,
                                         "--key", paced.key, "--json", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["part"] == "corpus" and d["date"] and d["commit"] and "corpus" in d["command"]
    assert d["as_expected"] == d["cases"]


def test_pooled_kill_part_on_cpu(tmp_path, monkeypatch, suite_cache):
    """`tokenpool suite pooled-kill`: a pooled worker killed while weights move; streams end with an error event,
    queued requests are retried, the worker returns, nothing leaks."""
    from typer.testing import CliRunner

    from controller.cli_suite import suite_app

    monkeypatch.setenv("TOKENPOOL_CACHE", str(suite_cache))
    out = tmp_path / "pk.json"
    r = CliRunner().invoke(suite_app, ["pooled-kill", "--during", "weights", "--streams", "4", "--queued", "2",
                                       "--json", str(out)])
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(out.read_text())
    assert d["part"] == "pooled_kill_during_weights" and d["pool_activity_before_kill"]["rose_after_s"] is not None
    assert d["running_streams_ended_with_error_event"] >= 1 and d["running_streams_cut_without_done"] == 0
    assert d["queued_started_before_kill"] == 0, d  # the queued requests waited: the batch of their model was full
    assert d["queued_requests_completed"] == 2 and d["request_after_restart_ok"], d
    assert d["dev_shm_files_leaked"] == [] and not d["victim_process_left"]



def test_drops_part_on_cpu(tmp_path, monkeypatch, suite_cache):
    """`tokenpool suite drops`: streams dropped at random points across three tiny models over a one-slot CPU arena;
    nothing held after, every model still serves."""
    import json

    from typer.testing import CliRunner

    from controller.cli_suite import suite_app

    monkeypatch.setenv("TOKENPOOL_CACHE", str(suite_cache))
    out = tmp_path / "drops.json"
    # 15 streams, seed 25: every drop point, each model decoding (mid_stream or never) and a long prompt refused
    # (tests/test_leak_storm.py drops 150 with a tenant limit)
    r = CliRunner().invoke(suite_app, ["drops", "--streams", "15", "--max-tokens", "20", "--seed", "25",
                                       "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["part"] == "drops" and sum(d["ends"].values()) == 15
    assert {k.split()[0] for k in d["ends"]} == {"request_head", "request_sent", "response_head", "mid_stream",
                                                 "never"}, d["ends"]
    assert d["back_to_zero_s"] is not None and not any(d["held_after"].values()), d
    assert len(d["requests_after_ok"]) == 3 and all(d["requests_after_ok"].values()), d

def test_disconnects_fit_a_short_context():
    """Against a model whose context is shorter than the part's 3000 tokens (the default server's demo models have
    2048) every stream was refused with 400 and the part still reported success; it now asks for what fits."""
    with faults.target(pace_s=0.01, max_num_seqs=8, ttft_s=60.0, max_model_len=512) as t:
        r = faults.run_disconnects(t, streams=4)
    assert r["refused"] == 0 and r["streaming_when_dropped"] == 4 and r["held_at_peak"]["running"] == 4, r
    assert r["max_tokens"] < 512 and r["refused_statuses"] == {}, r
    assert r["back_to_zero_s"] is not None and not any(r["held_after"].values()), r
