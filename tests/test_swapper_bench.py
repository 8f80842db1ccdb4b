"""`tokenpool bench swap` runs end to end on CPU at toy sizes (CI smoke; the figures mean nothing here)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from gpu_pool.pinned import default_shm_dir


def test_bench_swap_smoke(make_tiny, tmp_path, monkeypatch, request):
    from load_tests.bench_swap import run_bench_swap

    # A shm folder of its own (on the same tmpfs): the whole of /dev/shm changes under it while other test files
    # (another xdist worker, another run on the machine) make and remove their host copies
    shm = Path(tempfile.mkdtemp(prefix="tokenpool-test-swapper-bench-", dir=default_shm_dir()))
    request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
    monkeypatch.setenv("TOKENPOOL_SHM_DIR", str(shm))
    out = tmp_path / "swap.json"
    r = run_bench_swap(make_tiny("qwen2"), out)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(r))
    for key in ("device", "date", "commit", "command", "pcie_floor_s", "swap_in_s", "swap_in_vs_floor",
                "cold_load_s", "decode_slowdown", "switch_stall_no_prefetch_s", "switch_stall_with_prefetch_s",
                "kv_swap_out_64_gbs", "kv_swap_in_256_gbs", "hf_from_pretrained_s", "hf_to_device_from_pinned_s",
                "speedup_vs_hf_from_pretrained"):
        assert key in data, key
    assert data["kv_round_trip_exact_64"] and data["kv_round_trip_exact_256"]
    b = data["cold_load_breakdown"]
    assert b["nbytes"] == data["model_bytes"] and b["pinned"] == data["host_pinned"]
    assert all(b[k] >= 0 for k in ("create_s", "fill_s", "pin_s", "pin_wait_s"))
    assert data["cold_load_host"]["cpus"] >= 1 and data["cold_load_host"]["warm_read_s"] >= 0
    assert data["smoke_only"] == (not torch.cuda.is_available())
    # the decode figure comes from a real engine step; the GEMV stand-in is kept beside it
    eb = data["decode_beside_prefetch"]
    for mode in ("window_1GiB_poll_per_step", "all_enqueued_at_once"):
        s = eb[mode]["engine_step"]
        assert s["n_alone"] >= 1 and s["n_beside_prefetch"] >= 1 and s["alone_ms"] > 0 and s["poll_ms_median"] >= 0
        assert ("graph_replay" in eb[mode]) == torch.cuda.is_available()
    assert data["decode_slowdown"] == eb["window_1GiB_poll_per_step"]["engine_step"]["slowdown"]
    assert eb["batch"] == 8 and eb["prefetch_bytes"] > 0 and "LLMEngine.step()" in data["decode_slowdown_source"]
    assert data["decode_standin_steps_during_prefetch"] >= 1 and "decode_standin_slowdown" in data
    assert not list(shm.iterdir())  # the bench's host cache was removed
