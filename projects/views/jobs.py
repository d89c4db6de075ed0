"""Jobs: the list, one job's page, its htmx progress partial and Cancel."""
from __future__ import annotations

from django.shortcuts import redirect, render
from django.urls import path
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from projects import selectors
from projects.views import call_service, refresh_when_ended
from projects.services.jobs import job_cancel


def job_list(request):
    jobs = selectors.jobs_for_user(request.user)[:200]
    return render(request, "jobs/list.html", {"jobs": jobs})


def job_detail(request, job_id: int):
    job = selectors.job_for_user(request.user, job_id)
    return render(request, "jobs/detail.html", {"job": job, "project": job.project,
                                                "can_write": selectors.user_can_write(request.user, job.team)})


def job_progress(request, job_id: int):
    """The progress partial; it keeps polling (hx-trigger every 2s) only while the job runs.
    With ``?refresh=1`` (the job's own page) the job's end reloads the page, so controls that
    depend on the state (the Cancel button) follow."""
    job = selectors.job_for_user(request.user, job_id)
    response = render(request, "jobs/_progress.html", {"job": job, "refresh_on_end": request.GET.get("refresh") == "1"})
    return refresh_when_ended(request, response, ended=job.ended and request.GET.get("refresh") == "1")


@require_POST
def job_cancel_view(request, job_id: int):
    job = selectors.job_for_user(request.user, job_id)
    call_service(request, lambda: job_cancel(job=job, user=request.user), f"Cancel requested for job {job.pk}.")
    next_url = request.POST.get("next", "")
    if next_url and url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        return redirect(next_url)
    return redirect("job_detail", job_id=job.pk)


urlpatterns = [
    path("jobs/", job_list, name="job_list"),
    path("jobs/<int:job_id>/", job_detail, name="job_detail"),
    path("jobs/<int:job_id>/progress/", job_progress, name="job_progress"),
    path("jobs/<int:job_id>/cancel/", job_cancel_view, name="job_cancel"),
]
