"""recnix.daemon.sessions: how sessions end.

- The hooks' marks (RECNIX_HOOK_MARKS) of opted-in builds are made again when a
  session opens and removed when the last session of the .drv ends, so that an
  earlier build's late end never takes the mark of a new build of the same .drv (its
  post-build hook would then skip the finalisation).
- A finalised session undoes what its sandbox was given and removes its journal
  before its post-build hook hears back (after that, Nix may reuse the chroot's name,
  and a restarted service would take a journaled session for half finalised); its
  upstream connections and roots go in the background.

The sessions here are stand-ins with the attributes ``Sessions`` uses; the host tier
runs the real ones (tests/host/test_hook_env.py: no mark left after real opted-in
builds; test_finalise_atomic.py, test_service_restart.py: journals and roots)."""

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

    calls: list[str] = field(default_factory=list)
    letting_go: asyncio.Event | None = None  # let_go waits for it when set

    async def close(self, reason: str) -> None:
        self.state = SessionState.CLOSED
        self.reasons.append(reason)

    async def stop_serving(self) -> bool:
        self.calls.append("stop_serving")
        return True

    async def release_sandbox(self) -> None:
        self.calls.append("release_sandbox")

    def forget(self) -> None:
        self.calls.append("forget")

    async def let_go(self, reason: str) -> None:
        if self.letting_go is not None:
            await self.letting_go.wait()
        self.calls.append("let_go")
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


def test_a_finalised_session_answers_before_it_lets_go(tmp_path: Path) -> None:
    marks = tmp_path / "hook-marks"
    marks.mkdir(mode=0o700)
    registry = sessions(marks)
    session = StandIn("done")

    async def scenario() -> None:
        session.letting_go = asyncio.Event()
        registry.by_sid[session.sid] = session  # type: ignore[assignment]
        registry.mark(DRV)
        await registry.end_finalised(session)  # type: ignore[arg-type]
        # what the post-build hook's answer waits for: done, in this order
        assert session.calls == ["stop_serving", "release_sandbox", "forget"]
        assert registry.by_sid == {} and not (marks / Path(DRV).name).exists()
        # the rest goes on in the background until the service waits for it
        await asyncio.sleep(0)
        assert "let_go" not in session.calls
        session.letting_go.set()
        await registry.wait_closed()
        assert session.calls[-1] == "let_go" and session.reasons == ["finalised"]

    asyncio.run(scenario())
