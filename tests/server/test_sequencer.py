"""Per-model seq_id ordering, retries and consumed seq_ids."""

from __future__ import annotations

import pytest

from server.errors import NotFound
from server.sequencer import DEDUP_WINDOW, Sequencer
from tuft_jax.errors import InputError


@pytest.fixture
def seq() -> Sequencer:
    sequencer = Sequencer()
    sequencer.add_model("m")
    return sequencer


def recorder(log: list[int], seq_id: int):
    return lambda: log.append(seq_id)


def test_dispatches_in_seq_order_when_first_chunk_arrives_last(seq: Sequencer) -> None:
    log: list[int] = []
    for seq_id in (3, 2, 4):
        seq.submit("m", seq_id, f"r{seq_id}", recorder(log, seq_id))
    assert log == []
    seq.submit("m", 1, "r1", recorder(log, 1))
    assert log == [1, 2, 3, 4]


def test_retry_returns_original_request_id_and_does_not_dispatch_twice(seq: Sequencer) -> None:
    log: list[int] = []
    assert seq.submit("m", 2, "first", recorder(log, 2)) == "first"
    assert seq.submit("m", 2, "retry", recorder(log, 2)) == "first"
    seq.submit("m", 1, "r1", recorder(log, 1))
    assert seq.submit("m", 1, "again", recorder(log, 1)) == "r1"
    assert log == [1, 2]
    assert seq.accepted("m", 2) == "first"


def test_consumed_seq_id_unblocks_later_requests(seq: Sequencer) -> None:
    log: list[int] = []
    seq.submit("m", 2, "r2", recorder(log, 2))
    seq.consume("m", 1)
    assert log == [2]
    with pytest.raises(InputError, match="already used"):
        seq.submit("m", 1, "late", recorder(log, 1))


def test_consume_before_lower_seq_ids_waits_its_turn(seq: Sequencer) -> None:
    log: list[int] = []
    seq.consume("m", 2)
    seq.submit("m", 3, "r3", recorder(log, 3))
    assert log == []
    seq.submit("m", 1, "r1", recorder(log, 1))
    assert log == [1, 3]


def test_consume_ignores_accepted_and_unknown(seq: Sequencer) -> None:
    log: list[int] = []
    seq.submit("m", 2, "r2", recorder(log, 2))
    seq.consume("m", 2)  # accepted, waiting: must still run
    seq.consume("unknown-model", 1)
    seq.submit("m", 1, "r1", recorder(log, 1))
    assert log == [1, 2]


def test_models_are_independent(seq: Sequencer) -> None:
    seq.add_model("other")
    log: list[int] = []
    seq.submit("m", 2, "a", recorder(log, 2))
    seq.submit("other", 1, "b", recorder(log, 101))
    assert log == [101]


def test_invalid_and_unknown(seq: Sequencer) -> None:
    with pytest.raises(InputError, match="at least 1"):
        seq.submit("m", 0, "r", lambda: None)
    with pytest.raises(NotFound):
        seq.submit("nope", 1, "r", lambda: None)


def test_remove_model_reports_requests_never_dispatched(seq: Sequencer) -> None:
    seq.submit("m", 1, "r1", lambda: None)
    seq.submit("m", 3, "r3", lambda: None)
    seq.consume("m", 5)
    assert seq.remove_model("m") == ["r3"]
    assert seq.remove_model("m") == []


def test_old_request_ids_are_forgotten_after_the_window(seq: Sequencer) -> None:
    for seq_id in range(1, DEDUP_WINDOW + 3):
        seq.submit("m", seq_id, f"r{seq_id}", lambda: None)
    assert seq.accepted("m", 1) is None
    assert seq.accepted("m", DEDUP_WINDOW + 2) == f"r{DEDUP_WINDOW + 2}"
    with pytest.raises(InputError):
        seq.check_fresh("m", 1)
