"""Per-model seq_id ordering, retries and consumed seq_ids."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

import pytest

from server.errors import NotFound
from server.sequencer import DEDUP_WINDOW, Sequencer
from tuft_jax.errors import InputError

GAP_TIMEOUT_S = 90.0


class FakeClock:
    """A `call_later` whose time only moves when a test calls `advance`."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, FakeClock.Timer]] = []
        self._order = itertools.count()

    class Timer:
        def __init__(self, callback: Callable[[], None]) -> None:
            self.callback = callback
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeClock.Timer:
        timer = FakeClock.Timer(callback)
        heapq.heappush(self._timers, (self.now + delay, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while self._timers and self._timers[0][0] <= until:
            self.now, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()
        self.now = until

    def pending(self) -> int:
        return sum(not timer.cancelled for *_, timer in self._timers)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def seq(clock: FakeClock) -> Sequencer:
    sequencer = Sequencer(GAP_TIMEOUT_S, call_later=clock.call_later)
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


def test_a_gap_never_filled_is_skipped_after_the_timeout(
    seq: Sequencer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[int] = []
    seq.submit("m", 1, "r1", recorder(log, 1))
    seq.submit("m", 4, "r4", recorder(log, 4))  # 2 and 3 were unreadable: never accepted nor consumed
    clock.advance(30)
    seq.submit("m", 5, "r5", recorder(log, 5))
    clock.advance(GAP_TIMEOUT_S - 30 - 1)
    assert log == [1]
    with caplog.at_level(logging.WARNING, logger="server.sequencer"):
        clock.advance(1)
    assert log == [1, 4, 5]
    assert "skipping seq_id 2..3" in caplog.text
    for late in (2, 3):
        with pytest.raises(InputError, match=f"seq_id {late} .* was skipped"):
            seq.submit("m", late, "late", recorder(log, late))
    assert log == [1, 4, 5]
    assert clock.pending() == 0


def test_gap_timer_restarts_when_the_model_progresses(seq: Sequencer, clock: FakeClock) -> None:
    log: list[int] = []
    seq.submit("m", 3, "r3", recorder(log, 3))
    clock.advance(GAP_TIMEOUT_S - 1)
    seq.submit("m", 1, "r1", recorder(log, 1))  # 1 arrived in time; now 3 waits for 2
    assert log == [1]
    clock.advance(GAP_TIMEOUT_S - 1)
    assert log == [1]
    clock.advance(1)
    assert log == [1, 3]


def test_no_timer_while_nothing_waits(seq: Sequencer, clock: FakeClock) -> None:
    log: list[int] = []
    seq.submit("m", 2, "r2", recorder(log, 2))
    seq.submit("m", 1, "r1", recorder(log, 1))
    seq.consume("m", 3)
    assert clock.pending() == 0
    clock.advance(10 * GAP_TIMEOUT_S)
    assert log == [1, 2]
    seq.submit("m", 4, "r4", recorder(log, 4))
    assert log == [1, 2, 4]


def test_removed_model_cancels_its_gap_timer(seq: Sequencer, clock: FakeClock) -> None:
    seq.submit("m", 2, "r2", lambda: None)
    assert clock.pending() == 1
    assert seq.remove_model("m") == ["r2"]
    assert clock.pending() == 0
    seq.add_model("m")
    clock.advance(GAP_TIMEOUT_S)
    seq.submit("m", 1, "r1", lambda: None)  # the new model is not affected by the old timer
    assert seq.accepted("m", 1) == "r1"
