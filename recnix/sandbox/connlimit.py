"""The limit on concurrent connections to one socket a build can reach (a session's, a
guard's): ``policy.max-connections-per-session``. A build that opens more, or holds
them without a request, costs the service no more file descriptors than that."""

from __future__ import annotations


class ConnectionLimit:
    """At most ``maximum`` connections open at once; a refusal is counted, and worth a log
    line only once per burst (the 1st, 2nd, 4th, 8th... refusal)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.active = 0  # open now
        self.refused = 0  # closed at once so far: above maximum

    def take(self) -> bool:
        """Whether a new connection may be served (then :meth:`give_back` when it ends)."""
        if self.active >= self.maximum:
            self.refused += 1
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        """A connection :meth:`take` let in has ended."""
        self.active -= 1

    @property
    def refusal_worth_logging(self) -> bool:
        """Whether the last refusal starts a new burst (a power of two so far)."""
        return self.refused & (self.refused - 1) == 0

    def describe_refusals(self) -> str:
        """Why connections are closed, for the log and the audit."""
        return (
            f"more than {self.maximum} concurrent connections ({self.refused} refused so far; "
            "policy.max-connections-per-session)"
        )
