"""Waiting until a running gateway serves what was just saved: the gateway reloads keys and
deployments every ``GATEWAY_REFRESH_S`` seconds (see ``gateway.state``), so a script that
creates a key or changes a deployment and then sends a request at once, or after a fixed sleep,
may reach a gateway that does not know the change yet (401 or 404, or the old settings) — most
often on a loaded machine. ``wait_served`` polls ``GET /healthz`` with the key instead (plain
Python: no Django)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class GatewayNotReady(Exception):
    """The gateway did not serve the awaited state within the deadline (the message says what it
    served last)."""


def healthz(base_url: str, key: str, *, timeout_s: float = 10.0) -> dict:
    """``GET /healthz`` of the gateway at ``base_url`` (ends in ``/v1``, as clients are given)
    asked with ``key``: ``{"status": "ok"}`` for an unknown or revoked key, otherwise also
    ``deployments`` and ``versions`` (slug -> version) of the key's team. Raises OSError
    (``urllib.error.URLError``) when the gateway does not answer."""
    root = base_url.rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(root + "/healthz", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def wait_served(base_url: str, key: str, *, slug: str | None = None, version: int | None = None,
                known: bool = True, timeout_s: float = 120.0, poll_s: float = 0.1) -> dict:
    """Poll the gateway's ``/healthz`` until it knows ``key`` (``known=False``: until it no longer
    does, after a revocation) and, given ``slug``, serves that deployment of the key's team at
    ``version`` or later (any version when None). Returns the last ``/healthz`` answer. Raises
    GatewayNotReady after ``timeout_s`` seconds, saying what the gateway served last."""
    deadline = time.monotonic() + timeout_s
    last: dict | str = "no answer"
    while True:
        try:
            last = healthz(base_url, key)
            if not known:
                if "deployments" not in last:
                    return last
            elif "deployments" in last:
                served = (last.get("versions") or {}).get(slug) if slug is not None else None
                if slug is None or (served is not None and (version is None or served >= version)):
                    return last
        except (OSError, ValueError) as exc:  # not up yet, or a half-written answer
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            want = ("the key revoked" if not known else "the key" + (f" and {slug!r}" if slug else "")
                    + (f" at version >= {version}" if version is not None else ""))
            raise GatewayNotReady(f"the gateway at {base_url} did not serve {want} within {timeout_s:g} s; "
                                  f"it last answered: {last}")
        time.sleep(poll_s)
