"""Monthly quotas counted in SQLite: exceeded, surviving restarts, crash-loss bound, months."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from qpher_proxy.errors import QuotaExceeded, QuotaUnavailable
from qpher_proxy.ratelimit import QuotaCounter, month_of, seconds_to_next_month

JUNE_15 = calendar.timegm((2025, 6, 15, 12, 0, 0, 0, 0, 0))
JULY_1 = calendar.timegm((2025, 7, 1, 0, 0, 0, 0, 0, 0))


class FakeClock:
    def __init__(self, t: float = JUNE_15) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_quota_exceeded_with_retry_after_to_next_month(tmp_path: Path) -> None:
    clock = FakeClock()
    with QuotaCounter(tmp_path / "g.db", clock) as q:
        assert [q.check_and_count("acme", "sign", 3) for _ in range(3)] == [1, 2, 3]
        with pytest.raises(QuotaExceeded) as info:
            q.check_and_count("acme", "sign", 3)
        e = info.value
        assert (e.code, e.status) == ("quota_exceeded", 429)
        assert e.retry_after == JULY_1 - JUNE_15 == 16 * 86_400 - 12 * 3600
        assert e.headers == ((b"retry-after", str(e.retry_after).encode()),)
        assert q.usage("acme") == {"sign": 3}  # the refused call was not counted
        # other op classes and other tenants have their own counts
        assert q.check_and_count("acme", "kem", 3) == 1
        assert q.check_and_count("globex", "sign", 3) == 1
        assert q.usage("acme") == {"sign": 3, "kem": 1}
        assert q.usage("nobody") == {}


def test_unlimited_is_still_counted(tmp_path: Path) -> None:
    with QuotaCounter(tmp_path / "g.db", FakeClock()) as q:
        for _ in range(10):
            q.check_and_count("acme", "sign", None)
        assert q.usage("acme") == {"sign": 10}


def test_batch_counts_n_and_is_refused_whole(tmp_path: Path) -> None:
    with QuotaCounter(tmp_path / "g.db", FakeClock()) as q:
        assert q.check_and_count("acme", "sign", 10, n=7) == 7
        with pytest.raises(QuotaExceeded):
            q.check_and_count("acme", "sign", 10, n=4)
        assert q.check_and_count("acme", "sign", 10, n=3) == 10


def test_usage_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    with QuotaCounter(tmp_path / "g.db", clock) as q:
        for _ in range(5):
            q.check_and_count("acme", "sign", 5)
    with QuotaCounter(tmp_path / "g.db", clock) as q:  # a new process on the same database
        assert q.usage("acme") == {"sign": 5}
        with pytest.raises(QuotaExceeded):
            q.check_and_count("acme", "sign", 5)


def test_crash_loses_at_most_flush_every_minus_one(tmp_path: Path) -> None:
    clock = FakeClock()
    q = QuotaCounter(tmp_path / "g.db", clock, flush_every=10, flush_interval=60.0)
    for _ in range(25):
        q.check_and_count("acme", "sign", None)
    q._conn.close()  # SIGKILL: no close(), no flush
    with QuotaCounter(tmp_path / "g.db", clock) as after:
        survived = after.usage("acme")["sign"]
    assert survived == 20 and 25 - survived <= 10 - 1


def test_time_based_flush_with_a_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    q = QuotaCounter(tmp_path / "g.db", clock, flush_every=1000, flush_interval=1.0)
    q.check_and_count("acme", "sign", None)
    q.check_and_count("acme", "sign", None)
    clock.advance(1.0)
    q.check_and_count("acme", "sign", None)  # this one triggers the flush of all three
    q.check_and_count("acme", "sign", None)
    clock.advance(1.0)
    q.maybe_flush()  # the server's periodic task
    q.check_and_count("acme", "sign", None)  # pending, lost in the crash below
    q._conn.close()
    with QuotaCounter(tmp_path / "g.db", clock) as after:
        assert after.usage("acme") == {"sign": 4}


def test_month_boundary_starts_a_fresh_count(tmp_path: Path) -> None:
    clock = FakeClock(JULY_1 - 1)
    with QuotaCounter(tmp_path / "g.db", clock) as q:
        q.check_and_count("acme", "sign", 2)
        q.check_and_count("acme", "sign", 2)
        with pytest.raises(QuotaExceeded) as info:
            q.check_and_count("acme", "sign", 2)
        assert info.value.retry_after == 1
        clock.advance(1)
        assert q.check_and_count("acme", "sign", 2) == 1
        assert q.usage("acme") == {"sign": 1}
    with QuotaCounter(tmp_path / "g.db", FakeClock(JULY_1 - 1)) as june:
        assert june.usage("acme") == {"sign": 2}  # June's count is kept, in June's row


def test_two_counters_on_one_database_converge(tmp_path: Path) -> None:
    clock = FakeClock()
    with QuotaCounter(tmp_path / "g.db", clock, flush_every=1) as a, \
            QuotaCounter(tmp_path / "g.db", clock, flush_every=1) as b:
        a.check_and_count("acme", "sign", None)
        b.check_and_count("acme", "sign", None)
        assert b.usage("acme") == {"sign": 2}  # b's flush re-read the row
        a.check_and_count("acme", "sign", None)
        assert a.usage("acme") == {"sign": 3}


def test_failed_flush_refuses_and_does_not_count(tmp_path: Path) -> None:
    clock = FakeClock()
    q = QuotaCounter(tmp_path / "g.db", clock, flush_every=2)
    q.check_and_count("acme", "sign", None)
    q._conn.close()  # the database becomes unusable
    with pytest.raises(QuotaUnavailable) as info:
        q.check_and_count("acme", "sign", None)  # the second increment triggers a flush
    assert info.value.status == 503
    assert q.usage("acme") == {"sign": 1}


def test_month_helpers() -> None:
    assert month_of(JUNE_15) == "2025-06"
    assert month_of(calendar.timegm((2025, 12, 31, 23, 59, 59, 0, 0, 0))) == "2025-12"
    dec_31 = calendar.timegm((2025, 12, 31, 23, 59, 0, 0, 0, 0))
    assert seconds_to_next_month(dec_31) == 60
    assert seconds_to_next_month(dec_31 + 59.5) == 1


async def test_ensure_loaded_is_a_no_op_on_sqlite(tmp_path: Path) -> None:
    # the gateway awaits it before usage()/check_and_count() whatever the backend
    with QuotaCounter(tmp_path / "g.db") as q:
        assert not q.blocking
        await q.ensure_loaded("acme")
        assert q.check_and_count("acme", "sign", 2) == 1
