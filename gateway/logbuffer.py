"""Batched request logging: the request path appends a dict to an in-memory list; a background
task writes everything buffered in one multi-row INSERT every ``GATEWAY_FLUSH_S`` seconds (or
sooner once ``GATEWAY_FLUSH_ROWS`` are waiting). While Postgres is down rows wait in memory up to
``GATEWAY_BUFFER_MAX``; beyond that the oldest are dropped and counted, so memory stays bounded."""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

log = logging.getLogger("gateway")

FIELDS = ("deployment_id", "key_id", "version", "route", "status", "stream", "latency_ms", "upstream_ms",
          "input_tokens", "output_tokens", "confidence", "cost_usd", "agreed", "query", "response",
          "teacher_response", "finish_reason", "error", "created_at")


class LogBuffer:
    def __init__(self, *, flush_s: float = 1.0, flush_rows: int = 1000, max_rows: int = 100_000) -> None:
        self.rows: list[dict] = []
        self.flush_s = flush_s
        self.flush_rows = flush_rows
        self.max_rows = max_rows
        self.dropped = 0
        self.written = 0
        self._wake = asyncio.Event()

    def add(self, **row) -> None:
        """Buffer one row (keys: ``FIELDS``; ``created_at`` defaults to now, UTC)."""
        row.setdefault("created_at", datetime.now(timezone.utc))
        self.rows.append(row)
        if len(self.rows) > self.max_rows:
            drop = len(self.rows) - self.max_rows
            del self.rows[:drop]
            self.dropped += drop
        if len(self.rows) >= self.flush_rows:
            self._wake.set()

    async def run(self) -> None:
        """Flush forever (cancel to stop; ``flush`` once more on shutdown)."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Write what is buffered; on a database error put it back (bounded), except the rows of a
        deployment deleted meanwhile, which are dropped and counted. Returns rows written."""
        if not self.rows:
            return 0
        batch, self.rows = self.rows, []
        try:
            gone = await asyncio.to_thread(_insert, batch)
        except Exception as exc:  # noqa: BLE001 - the database may be down; keep serving
            log.warning("request log flush failed (%s rows kept): %s", len(batch), exc)
            self.rows[:0] = batch
            if len(self.rows) > self.max_rows:
                drop = len(self.rows) - self.max_rows
                del self.rows[:drop]
                self.dropped += drop
            return 0
        if gone:
            # Not put back: they would fail every later flush, and with it all request logging.
            log.warning("request log: %s rows dropped, their deployment was deleted", gone)
            self.dropped += gone
        self.written += len(batch) - gone
        return len(batch) - gone


def _insert(batch: list[dict]) -> int:
    """Write ``batch`` in one transaction. Rows of a deployment deleted since they were buffered
    are left out (a foreign-key error, not a database outage: kept, they would fail every later
    flush). Returns how many were left out; raises on any other database error."""
    from django.db import IntegrityError, close_old_connections, transaction

    from projects.models import Deployment, RequestLog

    close_old_connections()

    def write(rows: list[dict]) -> None:
        with transaction.atomic():
            RequestLog.objects.bulk_create([RequestLog(**{k: r.get(k) for k in FIELDS if k in r}) for r in rows],
                                           batch_size=2000)

    try:
        write(batch)
        return 0
    except IntegrityError:
        live = set(Deployment.objects.filter(pk__in={r.get("deployment_id") for r in batch})
                   .values_list("pk", flat=True))
        keep = [r for r in batch if r.get("deployment_id") in live]
        if len(keep) == len(batch):
            raise
        write(keep)
        return len(batch) - len(keep)
