"""Queries page: upload a file (its import runs on Celery with a progress bar and ends with its
report) and browse the project's queries (split filter, search, keyset pagination)."""
from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import path

from distillhub.request_limits import upload_view
from projects import selectors
from projects.forms import QuerySearchForm, UploadForm
from projects.models import Dataset
from projects.services import ServiceError
from projects.services.ingest import dataset_upload


# The upload's size limit (DISTILLHUB_MAX_UPLOAD_MB) is enforced before the body is read, by
# distillhub.request_limits (413); the file's own size is checked again by dataset_upload.
@upload_view
def queries_page(request, slug: str):
    project = selectors.project_for_user(request.user, slug)
    can_write = selectors.user_can_write(request.user, project.team)
    status = 200
    upload_form = UploadForm()
    if request.method == "POST":
        if not can_write:
            messages.error(request, "Your role in this team is read-only (viewer); ask an owner for member access.")
            status = 403
        else:
            upload_form = UploadForm(request.POST, request.FILES)
            if upload_form.is_valid():
                d = upload_form.cleaned_data
                try:
                    dataset = dataset_upload(project=project, upload=d["file"], user=request.user,
                                             text_column=d["text_column"].strip() or None,
                                             reference_column=d["reference_column"].strip() or None,
                                             golden=d["golden"], header=d["header"])
                except ServiceError as exc:
                    upload_form.add_error("file", str(exc))
                    status = 400
                else:
                    messages.success(request, f"Uploaded {dataset.name}; importing it now.")
                    return redirect("queries_page", slug=project.slug)
            else:
                status = 400
    search = QuerySearchForm(request.GET or None)
    filters = search.cleaned_data if search.is_valid() else {}
    page = selectors.query_page(project, split=filters.get("split") or "", search=(filters.get("q") or "").strip(),
                                after=filters.get("after"), before=filters.get("before"))
    datasets = list(project.datasets.select_related("job").order_by("-created_at")[:10])
    params = request.GET.copy()
    for k in ("after", "before"):
        params.pop(k, None)
    return render(request, "queries/page.html", {
        "project": project, "section": "queries", "can_write": can_write, "upload_form": upload_form,
        "search_form": search, "page": page, "counts": selectors.query_split_counts(project), "datasets": datasets,
        "filter_qs": params.urlencode(), "max_upload_mb": settings.MAX_UPLOAD_MB,
    }, status=status)


def dataset_card(request, slug: str, dataset_id: int):
    """The import report of one uploaded file (an htmx partial that polls while it imports)."""
    project = selectors.project_for_user(request.user, slug)
    try:
        dataset = project.datasets.select_related("job").get(pk=dataset_id)
    except Dataset.DoesNotExist:
        raise Http404("No such dataset") from None
    if request.method != "GET":
        from django.http import HttpResponseNotAllowed

        return HttpResponseNotAllowed(["GET"])
    return render(request, "queries/_dataset.html", {"project": project, "dataset": dataset})


urlpatterns = [
    path("p/<slug:slug>/queries/", queries_page, name="queries_page"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/", dataset_card, name="dataset_card"),
]
