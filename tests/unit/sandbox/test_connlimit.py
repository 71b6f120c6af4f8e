"""recnix.sandbox.connlimit: at most N connections at once; refusals logged once a burst."""

from __future__ import annotations

from recnix.sandbox.connlimit import ConnectionLimit


def test_at_most_the_maximum_and_room_again_when_one_ends():
    limit = ConnectionLimit(2)
    assert limit.take() and limit.take()
    assert not limit.take() and not limit.take()
    assert (limit.active, limit.refused) == (2, 2)
    limit.give_back()
    assert limit.take() and limit.active == 2


def test_refusals_are_worth_a_log_line_once_per_burst():
    limit = ConnectionLimit(0)
    logged = []
    for _ in range(20):
        assert not limit.take()
        if limit.refusal_worth_logging:
            logged.append(limit.refused)
    assert logged == [1, 2, 4, 8, 16]
    assert "20 refused so far" in limit.describe_refusals()
    assert "policy.max-connections-per-session" in limit.describe_refusals()
