"""recnix.daemon.sessions keeps the hooks' marks (RECNIX_HOOK_MARKS) of opted-in builds:
made again when a session opens, removed when the last session of the .drv ends, so
that an earlier build's late end never takes the mark of a new build of the same
.drv (its post-build hook would then skip the finalisation). The sessions here are
stand-ins with the attributes ``Sessions.end`` uses; the host tier runs the real ones
(tests/host/test_hook_env.py: no mark left after real opted-in builds)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from recnix.daemon.admission import Admission
from recnix.daemon.session import SessionState
from recnix.daemon.sessions import Sessions

DRV = f"/nix/store/{'a' * 32}-outer.drv"


@dataclass
class StandIn:
    sid: str
    drv_path: str = DRV
    state: SessionState = SessionState.OPEN
    reasons: list[str] = field(default_factory=list)

    async def close(self, reason: str) -> None:
        self.state = SessionState.CLOSED
        self.reasons.append(reason)

    def drop_slot(self) -> bool:
        return False


class NoAudit:
    def write(self, *args: object, **kwargs: object) -> None:
        pass


def sessions(marks: Path) -> Sessions:
    admission = Admission(2, marks, None)
    return Sessions(None, None, False, admission, None, NoAudit(), marks)  # type: ignore[arg-type]


def test_the_last_session_of_a_drv_takes_its_mark(tmp_path: Path) -> None:
    marks = tmp_path / "hook-marks"
    marks.mkdir(mode=0o700)
    registry = sessions(marks)
    mark = marks / Path(DRV).name
    old, new = StandIn("old"), StandIn("new")

    async def scenario() -> None:
        registry.by_sid[old.sid] = old  # type: ignore[assignment]
        registry.mark(DRV)
        # A new build of the same .drv opened before the old one's end was noticed.
        registry.by_sid[new.sid] = new  # type: ignore[assignment]
        registry.mark(DRV)
        await registry.end(old, None, "build gone")  # type: ignore[arg-type]
        assert mark.exists(), "the old build's end took the new build's mark"
        await registry.end(new, None, "finalised")  # type: ignore[arg-type]
        assert not mark.exists()
        # A session that opens after the hook's mark was taken marks its build again.
        registry.mark(DRV)
        assert mark.exists() and mark.stat().st_mode & 0o777 == 0o600

    asyncio.run(scenario())
    assert old.reasons == ["build gone"] and new.reasons == ["finalised"]


def test_marks_are_never_made_through_a_symlink(tmp_path: Path) -> None:
    marks = tmp_path / "hook-marks"
    marks.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    (marks / Path(DRV).name).symlink_to(target)
    sessions(marks).mark(DRV)
    assert not target.exists()
