"""One torch intra-op thread while a test file that computes with torch in the test process runs: import
`one_torch_thread` into the file (an autouse fixture, module-scoped, works where it is imported).

The suite runs several xdist workers on 2 cores, beside the live servers' workers; torch's default of one thread a core
oversubscribes them, and OpenMP's waiting threads spin through the other's time slices. On a busy 2-core machine
(-n 0): tests/test_bench_engine.py, test_engine_batching.py and test_plan_ahead.py 95 s with 2 threads, 35 s with 1
(again: 178 s, 71 s); tests/test_smollm2_parity.py 147 s, 28-34 s. (A live server's processes get
OMP_NUM_THREADS=1 from load_tests/live_server.py already.)"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
