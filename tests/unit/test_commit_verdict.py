"""What one answer about a transaction whose COMMIT answer was lost is taken to mean.

A transaction id names a transaction only within one run of one server: a restarted server
or a promoted standby gives again the ids of transactions whose WAL it never had. So an
answer from the run that gave the id is about ours; from another run only an answer that
rules ours out counts, and "committed" cannot be known.
"""

from __future__ import annotations

import pytest

from qx.db._commit import TransactionHandle, _Verdict, _verdict

OURS = TransactionHandle.parse("731@1733450000.123456")


def test_a_handle_reads_the_id_and_the_server_run() -> None:
    assert TransactionHandle("731", "1733450000.123456") == OURS


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("committed", _Verdict.COMMITTED),
        ("aborted", _Verdict.NOT_COMMITTED),
        ("in progress", _Verdict.ASK_AGAIN),  # the server has not yet seen the client go
        (None, _Verdict.UNKNOWABLE),  # too old to be remembered
    ],
)
def test_the_run_that_gave_the_id_answers_for_ours(status: str | None, expected: _Verdict) -> None:
    assert _verdict(OURS, status, OURS.server) is expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("not reached", _Verdict.NOT_COMMITTED),  # ours is not in this history
        ("aborted", _Verdict.NOT_COMMITTED),  # ours, or another: neither committed ours
        ("in progress", _Verdict.NOT_COMMITTED),  # ours died with its run: another has it
        ("committed", _Verdict.UNKNOWABLE),  # may be the other transaction's
        (None, _Verdict.UNKNOWABLE),
    ],
)
def test_another_run_counts_only_when_it_rules_ours_out(
    status: str | None, expected: _Verdict
) -> None:
    assert _verdict(OURS, status, "1733459999.5") is expected
