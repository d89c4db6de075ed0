"""Reads for serving: deployments and keys for a user, live figures of a deployment (agreement,
fallback rate, latency, cost, the divergence alert and the promote rule) and its time series for
the monitoring charts. All computed in Postgres from RequestLog."""
from __future__ import annotations

from django.db import connection
from django.http import Http404

from projects.models import Deployment, GatewayKey, Project
from projects.selectors import project_for_user, teams_for_user

ROUTES = ("student", "teacher", "fallback", "shadow")
MIN_ALERT_ROWS = 20  # the alert needs this many shadow comparisons before it may fire


def deployments_for_project(project: Project):
    return Deployment.objects.filter(project=project).select_related("teacher", "student_artifact").order_by("-created_at")


def deployment_for_user(user, slug: str, deployment_id: int) -> Deployment:
    """The deployment ``deployment_id`` of project ``slug`` for a member of its team; Http404 otherwise."""
    project = project_for_user(user, slug)
    try:
        return Deployment.objects.select_related("project", "project__team", "teacher", "student_artifact",
                                                 "candidate_artifact", "retrain_run").get(pk=deployment_id, project=project)
    except Deployment.DoesNotExist:
        raise Http404("No such deployment") from None


def gateway_keys_for_team(team):
    return GatewayKey.objects.filter(team=team).order_by("-created_at")


def gateway_key_for_user(user, slug: str, key_id: int) -> GatewayKey:
    """Key ``key_id`` of the team owning project ``slug``, for a member of that team; Http404 otherwise."""
    project = project_for_user(user, slug)
    try:
        return GatewayKey.objects.select_related("team").get(pk=key_id, team=project.team, team__in=teams_for_user(user))
    except GatewayKey.DoesNotExist:
        raise Http404("No such key") from None


def _window_agreement(dep_id: int, n: int) -> tuple[float | None, int]:
    """Agreement (fraction) over the last ``n`` shadow comparisons and how many there were."""
    with connection.cursor() as cur:
        cur.execute("""SELECT avg(CASE WHEN agreed THEN 1.0 ELSE 0.0 END), count(*) FROM (
                         SELECT agreed FROM projects_requestlog WHERE deployment_id = %s AND route = 'shadow'
                         AND agreed IS NOT NULL ORDER BY id DESC LIMIT %s) w""", [dep_id, n])
        avg, count = cur.fetchone()
    return (float(avg) if avg is not None else None), int(count)


def deployment_live_figures(*, deployment: Deployment, recent: int = 2000) -> dict:
    """Headline figures over the last ``recent`` requests: ``{requests: {route: n} (all time),
    agreement, agreement_n (over promote_window shadow comparisons), quality_delta (1 -
    agreement), fallback_rate (fallback / student-routed), latency_ms: {route: {p50, p95}},
    cost_per_1k_usd: {route: x}, alert: {firing, agreement, n, threshold}, promote: {ready,
    reason}}``."""
    dep = deployment
    with connection.cursor() as cur:
        cur.execute("SELECT route, count(*) FROM projects_requestlog WHERE deployment_id = %s GROUP BY route", [dep.pk])
        counts = {r: n for r, n in cur.fetchall()}
        cur.execute("""SELECT route, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                              percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms), avg(cost_usd) * 1000, count(*),
                              sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END)
                       FROM (SELECT route, latency_ms, cost_usd, status FROM projects_requestlog
                             WHERE deployment_id = %s AND route <> 'shadow' ORDER BY id DESC LIMIT %s) w
                       GROUP BY route""", [dep.pk, recent])
        lat, cost, errors, recent_counts = {}, {}, 0, {}
        for route, p50, p95, c1k, n, errs in cur.fetchall():
            lat[route] = {"p50": p50, "p95": p95}
            cost[route] = float(c1k) if c1k is not None else None
            recent_counts[route] = n
            errors += errs or 0
    agreement, n_agree = _window_agreement(dep.pk, dep.promote_window)
    alert_agreement, n_alert = _window_agreement(dep.pk, dep.alert_window)
    student_routed = recent_counts.get("student", 0) + recent_counts.get("fallback", 0)
    fallback_rate = recent_counts.get("fallback", 0) / student_routed if student_routed else None
    delta = 1.0 - agreement if agreement is not None else None
    firing = (alert_agreement is not None and n_alert >= min(MIN_ALERT_ROWS, dep.alert_window)
              and alert_agreement < dep.alert_agreement)
    if dep.student_share >= 1.0:
        ready, reason = False, "the student already takes 100 % of traffic"
    elif n_agree < dep.promote_window:
        ready, reason = False, f"{n_agree} of {dep.promote_window} shadow comparisons so far"
    elif delta is not None and delta < dep.promote_delta:
        ready, reason = True, (f"quality delta {delta * 100:.1f} % < {dep.promote_delta * 100:.1f} % over the last "
                               f"{n_agree} shadow comparisons")
    else:
        ready, reason = False, (f"quality delta {delta * 100:.1f} % is not under {dep.promote_delta * 100:.1f} %"
                                if delta is not None else "no shadow comparisons")
    return {"requests": counts, "total": sum(v for k, v in counts.items() if k != "shadow"),
            "agreement": agreement, "agreement_n": n_agree, "quality_delta": delta, "fallback_rate": fallback_rate,
            "latency_ms": lat, "cost_per_1k_usd": cost, "recent_errors": errors,
            "alert": {"firing": firing, "agreement": alert_agreement, "n": n_alert, "threshold": dep.alert_agreement},
            "promote": {"ready": ready, "reason": reason}}


def deployment_timeseries(*, deployment: Deployment, hours: float = 24.0) -> dict:
    """Per time bucket (a minute, an hour or a day, whichever gives at most a few hundred
    points over ``hours``) and route: ``{"bucket": "minute"|"hour"|"day", "rows": [{t, route,
    n, p50, p95, cost_per_1k, agreement, errors}], "start": datetime, "end": datetime}``;
    ``agreement`` only on shadow rows; ``start``/``end`` the window (the charts' time axis)."""
    from datetime import timedelta

    from django.utils import timezone

    bucket = "minute" if hours <= 6 else ("hour" if hours <= 24 * 14 else "day")
    end = timezone.now()
    with connection.cursor() as cur:
        cur.execute(f"""SELECT date_trunc('{bucket}', created_at) AS t, route, count(*),
                              percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                              percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
                              avg(cost_usd) * 1000,
                              avg(CASE WHEN agreed THEN 1.0 WHEN agreed = false THEN 0.0 END),
                              sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END)
                       FROM projects_requestlog
                       WHERE deployment_id = %s AND created_at >= now() - make_interval(secs => %s)
                       GROUP BY 1, 2 ORDER BY 1, 2""", [deployment.pk, hours * 3600.0])
        rows = [{"t": t, "route": r, "n": n, "p50": p50, "p95": p95,
                 "cost_per_1k": float(c) if c is not None else None,
                 "agreement": float(a) if a is not None else None, "errors": e}
                for t, r, n, p50, p95, c, a, e in cur.fetchall()]
    return {"bucket": bucket, "rows": rows, "start": end - timedelta(hours=hours), "end": end}


def recent_requests(*, deployment: Deployment, limit: int = 50):
    return deployment.requests.order_by("-id")[:limit]
