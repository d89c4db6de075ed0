"""The gateway's decisions as pure functions: which route a request takes, how confident a
student answer is, and whether two answers agree. No I/O, no Django."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections.abc import Sequence


def route_fraction(slug: str, user: str | None, rng: random.Random | None = None) -> float:
    """A number in [0, 1) that decides the route: the request goes to the student when it is
    under the student share. With a ``user`` it is a hash of (deployment, user), so one user
    always lands on the same side for a given share (sticky) and raising the share only moves
    users from teacher to student; without one it is uniform random."""
    if user:
        h = hashlib.blake2b(f"{slug}\x00{user}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2.0 ** 64
    return (rng or random).random()


def mean_token_logprob(logprobs: dict | None) -> float | None:
    """The mean log-probability (natural log, <= 0) of the answer's tokens from an OpenAI
    ``choices[0].logprobs`` object (``{"content": [{"token", "logprob", ...}]}``); None when
    absent or empty."""
    if not logprobs or not isinstance(logprobs, dict):
        return None
    items = logprobs.get("content") or []
    vals = [float(t["logprob"]) for t in items if isinstance(t, dict) and t.get("logprob") is not None]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return None
    return sum(vals) / len(vals)


def below_threshold(confidence: float | None, threshold: float | None) -> bool:
    """True when a student answer must go to the teacher: a threshold is set and the answer's
    confidence is under it, or unknown (a student that cannot say how sure it is, under a
    threshold, is not trusted)."""
    if threshold is None:
        return False
    return confidence is None or confidence < threshold


def _norm(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).casefold().strip()
    return re.sub(r"\s+", " ", s).strip(" .:;\"'`*")


def answers_agree(student: str | None, teacher: str | None, *, task_type: str, labels: Sequence[str] = ()) -> bool | None:
    """Whether a student and a teacher answer say the same thing: the same label (matched
    against the label set) for classification, the same JSON value for extraction, the same
    normalised text otherwise. None when either answer is missing."""
    if student is None or teacher is None:
        return None
    if task_type == "classification" and labels:
        from workers.pipeline.prompts import match_label

        a, b = match_label(student, tuple(labels)), match_label(teacher, tuple(labels))
        if a is not None or b is not None:
            return a == b
    if task_type == "extraction":
        try:
            return json.loads(student) == json.loads(teacher)
        except (ValueError, TypeError):
            pass
    return _norm(student) == _norm(teacher)


def last_user_text(messages) -> str | None:
    """The text of the last user message of an OpenAI ``messages`` list (string content, or the
    text parts of a content list); None when there is none or a text part's ``text`` is not a
    string."""
    if not isinstance(messages, list):
        return None
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                texts = [p.get("text") for p in c if isinstance(p, dict) and p.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    return None  # a text part whose text is not a string: malformed
                return "".join(texts)
            return None
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation) of ``values``; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
