"""Post-build: give a session's outputs the references to what the build added or
built (recnix.store.register), all or nothing; or make the outputs invalid.

The service calls it for the post-build hook's ``finalise``, for a build that
ended without one (the liveness watcher), and at start for sessions whose build
ended while the service was down. Ending the session is the service's business:
this module only finalises, invalidates, and says what happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from recnix.daemon.audit import AuditLog
from recnix.daemon.journal import SessionRecord
from recnix.daemon.session import Session
from recnix.store.invalidate import InvalidateError, invalidate_paths, invalidated_message
from recnix.store.register import (
    DaemonQueries,
    FinaliseError,
    FinaliseReport,
    finalise_outputs,
    outputs_of,
)
from recnix.store.seam import StoreError
from recnix.store.upstreampool import UpstreamPool

log = logging.getLogger("recnix.daemon.finalisation")


class Finaliser:
    """Finalises or invalidates the outputs of recursive builds, and audits it."""

    def __init__(self, pool: UpstreamPool, audit: AuditLog, secret_key_files: list[str]) -> None:
        self.pool = pool
        self.queries = DaemonQueries(pool)
        self.audit = audit
        self.secret_key_files = secret_key_files  # signing.secret-key-files: re-sign with these

    async def finalise(self, session: Session, out_paths: list[str]) -> list[str]:
        """Add the references the outputs of ``session`` have to its paths; the messages
        for the build's log. On any failure the outputs are made invalid and the
        FinaliseError raised says so."""
        started = time.perf_counter()
        drv_path = session.drv_path
        session.begin_finalising()
        try:
            report = await finalise_outputs(
                drv_path,
                set(session.added),
                self.secret_key_files,
                os.environ,
                self.queries,
                session.take_registrar(),
                drv=session.drv,
            )
        except Exception as e:
            if not isinstance(e, FinaliseError):
                log.exception("session %s: finalisation failed", session.sid)
            reason = str(e) if isinstance(e, FinaliseError) else f"internal error: {e!r}"
            raise await self.invalidate(
                drv_path, out_paths, reason, session.sid, set(session.added)
            ) from None
        self._audit_finalised(session.sid, drv_path, report)
        log.info(
            "session %s finalised in %.1f ms (%d reference(s) added)",
            session.sid,
            1e3 * (time.perf_counter() - started),
            sum(len(refs) for refs in report.added_refs.values()),
        )
        return [
            f"added {len(refs)} reference(s) to {out}: {' '.join(sorted(refs))}"
            for out, refs in sorted(report.added_refs.items())
            if refs
        ]

    async def finish_ended(self, record: SessionRecord) -> str:
        """A journaled session whose build ended while the service was down: its valid
        outputs may lack references (no post-build hook reached recnix): finalise them
        with the journaled session paths (GC-rooted until the service has started), or
        invalidate them. Returns what happened."""
        ended = "the build ended while recnix was not running"
        try:
            outputs = await outputs_of(record.drv_path, self.queries)
            upstream = await self.pool.fresh()
            try:
                valid = await upstream.query_valid_paths(sorted(outputs.values()))
            finally:
                await upstream.close()
        except (FinaliseError, StoreError, OSError) as e:
            return f"{ended}; {await self.invalidate(record.drv_path, [], str(e), record.sid)}"
        if not valid:
            return ended  # it failed, or the post-build hook invalidated its outputs
        try:
            report = await finalise_outputs(
                record.drv_path,
                set(record.allowed),
                self.secret_key_files,
                os.environ,
                self.queries,
            )
        except FinaliseError as e:
            error = await self.invalidate(
                record.drv_path, [], str(e), record.sid, set(record.allowed)
            )
            return f"{ended}; {error}"
        self._audit_finalised(record.sid, record.drv_path, report)
        added = sum(len(refs) for refs in report.added_refs.values())
        return f"{ended}; its outputs were finalised now ({added} reference(s) added)"

    def _audit_finalised(self, sid: str, drv_path: str, report: FinaliseReport) -> None:
        self.audit.write(
            "finalised",
            sid,
            drv=drv_path,
            outputs=sorted(report.outputs.values()),
            added_refs={k: sorted(v) for k, v in report.added_refs.items()},
        )

    async def invalidate(
        self,
        drv_path: str,
        out_paths: list[str],
        reason: str,
        sid: str | None = None,
        session_paths: set[str] | None = None,
    ) -> FinaliseError:
        """Make the outputs of ``drv_path`` invalid because ``reason``; the error that
        says what happened. If they cannot be (a valid path outside them refers to one),
        register their references to ``session_paths`` unchecked instead, so that at
        least their closure is complete."""
        loop = asyncio.get_running_loop()
        outputs = set(out_paths)
        try:
            named = await outputs_of(drv_path, self.queries)
            outputs |= set(named.values())
            await loop.run_in_executor(None, invalidate_paths, sorted(outputs))
        except (FinaliseError, InvalidateError) as e:
            self.audit.write(
                "invalidation-failed",
                sid or "",
                drv=drv_path,
                outputs=sorted(outputs),
                error=str(e),
            )
            log.error("cannot invalidate the outputs of %s: %s (after: %s)", drv_path, e, reason)
            completed = await self._complete_closure(drv_path, session_paths or set())
            return FinaliseError(
                f"{reason}; and recnix could not invalidate the outputs of {drv_path} ({e}): "
                f"they stay valid, {completed}; delete them with "
                "`nix-store --delete --ignore-liveness` once the build is over"
            )
        self.audit.write(
            "invalidated", sid or "", drv=drv_path, outputs=sorted(outputs), reason=reason
        )
        message = invalidated_message(outputs, reason)
        log.warning("%s", message)
        return FinaliseError(message)

    async def _complete_closure(self, drv_path: str, session_paths: set[str]) -> str:
        """The fallback when outputs cannot be invalidated: add their references to
        ``session_paths`` without checking allowedReferences & co.; what happened."""
        if not session_paths:
            return "and may lack references"
        try:
            await finalise_outputs(
                drv_path,
                session_paths,
                self.secret_key_files,
                os.environ,
                self.queries,
                check=False,
            )
        except FinaliseError as e:
            return f"and may lack references (registering them failed too: {e})"
        return (
            "with the references recnix found registered unchecked (their closure is "
            "complete, but they may break the derivation's constraints)"
        )
