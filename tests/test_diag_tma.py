"""load_tests/diag_tma's TMA kernel (a research tool for issue 20) against F.linear in Triton's CPU interpreter."""

from tests.triton_interp import interpret


def test_tma_rows_kernel_matches_linear_plain_and_split_k():
    interpret("from load_tests.diag_tma import check; check()")
