"""Importing query files into a project (projects/services/ingest.py, workers/runs/ingest.py), the Queries page, the
project settings page and ``distill import``, on real PostgreSQL and a real Celery worker."""
from __future__ import annotations

import json
import threading
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects.models import Dataset, Job, Query
from projects.services import InvalidInput, NotAllowed
from projects.services.ingest import dataset_report
from workers.runs.ingest import dataset_import
from projects.services.projects import project_create
from tests.conftest import wait_job
from workers.progress import JobCancelled


def write(tmp_path, name: str, data: bytes | str):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def do_import(project, path, **kw):
    return dataset_import(project=project, file_path=path, filename=path.name, **kw)


@pytest.mark.django_db
def test_banking77_train_csv(project, shared_data):
    path = shared_data / "banking77" / "train.csv"
    ds = do_import(project, path)
    report = dataset_report(dataset=ds)
    # 10,003 rows; 4 differ from another only by surrounding line breaks, so they are duplicates.
    assert report["imported"] == 9999 and report["duplicates"] == 4 and report["skipped"] == []
    assert report["text_column"] == "text" and report["reference_column"] == "category"
    assert sum(report["splits"].values()) == 9999 and report["golden"] == 0
    qs = Query.objects.filter(project=project)
    assert qs.count() == 9999
    assert qs.values("reference").distinct().count() == 77
    assert qs.get(line=2).text == "I am still waiting on my card?" and qs.get(line=2).reference == "card_arrival"
    assert not qs.filter(text__contains="\r").exists() and not qs.filter(text__startswith="\n").exists()
    c = report["splits"]
    assert 0.77 < c["train"] / 9999 < 0.83 and 0.08 < c["test"] / 9999 < 0.12
    assert {r["split"]: r["n"] for r in qs.values("split").annotate(n=__import__("django.db.models", fromlist=["Count"]).Count("id"))} == c


@pytest.mark.django_db
def test_sms_spam_collection(project, shared_data):
    path = shared_data / "sms_spam" / "SMSSpamCollection.tsv"
    ds = do_import(project, path, text_column="2", reference_column="1")
    assert (ds.imported, ds.duplicates, ds.skipped) == (5158, 416, [])
    qs = Query.objects.filter(project=project)
    assert set(qs.values_list("reference", flat=True)) == {"ham", "spam"}
    assert not qs.filter(text__contains="&lt;").exists() and qs.filter(text__contains="<#>").exists()
    assert not qs.filter(text__contains="\x92").exists() and qs.filter(text__contains="’").exists()


@pytest.mark.django_db
def test_snips_json_with_cesu8_bytes(project, shared_data):
    path = shared_data / "snips_nlu" / "train_PlayMusic_full.json"
    ds = do_import(project, path)
    assert (ds.imported, ds.duplicates, ds.skipped) == (1979, 21, [])
    assert any("CESU-8" in w["reason"] for w in ds.report["warnings"])
    q = Query.objects.get(project=project, text__contains="Pop Punk Perfection")
    assert "\U0001f355" in q.text and q.reference == "PlayMusic"
    assert q.text == "I want toi hear some Pop Punk Perfection \U0001f355 off of Deezer"
    assert {"entity": "playlist", "text": "Pop Punk Perfection \U0001f355"} in q.metadata["slots"]
    assert q.metadata["group"] == "PlayMusic"


@pytest.mark.django_db
def test_small_csv_exact_report_and_texts(project, tmp_path):
    data = ("\ufefftext,label,channel\r\n"
            "Café opening hours?,hours,web\r\n"
            "\r\n"
            '"Two\r\nlines",other,app\r\n'
            "CAFÉ   opening hours?,hours,app\r\n"
            ",x,web\r\n"
            "fine &amp; dandy,other,sms\r\n")
    ds = do_import(project, write(tmp_path, "q.csv", data))
    r = dataset_report(dataset=ds)
    assert (r["imported"], r["duplicates"]) == (3, 1)
    assert r["skipped"] == [{"line": 3, "reason": "empty"}, {"line": 7, "reason": "empty: no text in column 'text'"}]
    rows = list(Query.objects.filter(project=project).order_by("line").values_list("line", "text", "reference", "metadata"))
    assert rows == [(2, "Café opening hours?", "hours", {"channel": "web"}), (4, "Two\nlines", "other", {"channel": "app"}),
                    (8, "fine & dandy", "other", {"channel": "sms"})]


@pytest.mark.django_db
def test_double_import_adds_nothing_and_keeps_splits(project, team, owner, tmp_path):
    lines = "\n".join(f"query number {i}" for i in range(300))
    path = write(tmp_path, "q.txt", lines)
    first = do_import(project, path)
    splits = dict(Query.objects.filter(project=project).values_list("text", "split"))
    second = do_import(project, path)
    assert (first.imported, second.imported, second.duplicates) == (300, 0, 300)
    assert second.report["splits"] == {"train": 0, "validation": 0, "test": 0}
    # The same file in another project with the same fractions: every query in the same split.
    other = project_create(team=team, user=owner, name="Copy", task_type="generation")
    do_import(other, path)
    assert dict(Query.objects.filter(project=other).values_list("text", "split")) == splits


@pytest.mark.django_db
def test_second_import_counts_queries_already_in_the_project_as_duplicates(project, tmp_path):
    # The first file goes straight into the empty project; the second through ON CONFLICT.
    first = do_import(project, write(tmp_path, "a.txt", "".join(f"query number {i}\n" for i in range(300))))
    second_lines = ([f"  QUERY   Number {i} \n" for i in range(100)]  # same normalised form
                    + [f"new query {i}\n" for i in range(50)] + ["new query 7\n"] * 5)
    second = do_import(project, write(tmp_path, "b.txt", "".join(second_lines)))
    assert (first.imported, first.duplicates) == (300, 0)
    assert (second.imported, second.duplicates) == (50, 105)
    assert sum(second.report["splits"].values()) == 50
    assert Query.objects.filter(project=project).count() == 350
    assert Query.objects.filter(project=project, dataset=second).count() == 50


@pytest.mark.django_db
def test_a_file_past_the_in_memory_dedup_limit_imports_the_same(project, team, owner, tmp_path, monkeypatch):
    import workers.runs.ingest as ingest

    lines = "".join(f"query number {i}\n" for i in range(300)) + "".join(f"QUERY  number {i}\n" for i in range(0, 300, 7))
    path = write(tmp_path, "q.txt", lines)
    monkeypatch.setattr(ingest, "SEEN_LIMIT", 50)  # the first 50 go straight in, the rest is staged
    small = do_import(project, path)
    monkeypatch.setattr(ingest, "SEEN_LIMIT", 10**9)
    whole = do_import(project_create(team=team, user=owner, name="Other", task_type="generation"), path)
    assert (small.imported, small.duplicates) == (whole.imported, whole.duplicates) == (300, 43)
    assert small.report["splits"] == whole.report["splits"] and sum(small.report["splits"].values()) == 300
    assert Query.objects.filter(project=project).count() == 300


@pytest.mark.django_db(transaction=True)
def test_two_imports_of_one_file_at_once_store_each_query_once(project, tmp_path):
    from django.db import connection

    path = write(tmp_path, "q.txt", "".join(f"query number {i}\n" for i in range(3000)) + "query number 5\n")
    results, errors = [], []

    def run():
        try:
            results.append(do_import(project, path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted((ds.imported, ds.duplicates) for ds in results) == [(0, 3001), (3000, 1)]
    assert Query.objects.filter(project=project).count() == 3000


@pytest.mark.django_db
def test_search_uses_the_index_once_it_caught_up_and_scans_before(project, tmp_path):
    from projects.models import Project, QuerySearch
    from projects.selectors import query_page
    from workers.runs.ingest import query_search_index

    do_import(project, write(tmp_path, "q.txt", "".join(f"question number {i}\n" for i in range(300))
                             + "Ünïcode NEEDLE in a haystack\n"))
    versions = Project.objects.values_list("search_version", "search_indexed_version").get(pk=project.pk)
    assert versions == (1, 0) and not QuerySearch.objects.filter(project_id=project.pk).exists()

    def texts(search):
        return sorted(q.text for q in query_page(project, search=search, limit=500)["rows"])

    expected = ["question number 29"] + [f"question number {i}" for i in range(290, 300)]
    # Before the indexer ran: the search scans the queries and misses nothing.
    assert texts("ünïcode needle") == ["Ünïcode NEEDLE in a haystack"] and texts("NUMBER 29") == expected
    assert query_search_index(project_id=project.pk, batch=128) == 301
    assert query_search_index(project_id=project.pk) == 0  # a second run adds nothing
    assert Project.objects.values_list("search_indexed_version", flat=True).get(pk=project.pk) == 1
    assert QuerySearch.objects.filter(project_id=project.pk).count() == 301
    # Through the index: the same answers.
    assert texts("ünïcode needle") == ["Ünïcode NEEDLE in a haystack"] and texts("NUMBER 29") == expected
    # Deleting queries deletes their search rows (ON DELETE CASCADE in the database).
    Query.objects.filter(project=project, text__startswith="question number 1").delete()
    assert QuerySearch.objects.filter(project_id=project.pk).count() == 301 - 111
    assert texts("number 1") == []


def test_the_worker_indexes_an_import_for_search(celery_worker, project, tmp_path):
    import time

    from projects.models import Project, QuerySearch

    do_import(project, write(tmp_path, "q.txt", "".join(f"question number {i}\n" for i in range(500))))
    deadline = time.time() + 240  # the worker may be busy on a loaded machine; ends when indexed
    while time.time() < deadline:
        version, indexed = Project.objects.values_list("search_version", "search_indexed_version").get(pk=project.pk)
        if indexed == version == 1:
            break
        time.sleep(0.25)
    assert (version, indexed) == (1, 1)
    assert QuerySearch.objects.filter(project_id=project.pk).count() == 500


@pytest.mark.django_db
def test_golden_set_is_kept_apart(project, tmp_path):
    do_import(project, write(tmp_path, "train.txt", "where is my card\nrefund please\n"))
    ds = do_import(project, write(tmp_path, "golden.jsonl", '{"query": "Where is my card", "reference": "card_arrival"}\n'
                                                              '{"query": "new one", "reference": "other"}\n'), golden=True)
    r = dataset_report(dataset=ds)
    assert r["imported"] == 2 and r["golden"] == 2 and r["splits"] == {"train": 0, "validation": 0, "test": 0}
    assert set(Query.objects.filter(dataset=ds).values_list("split", "golden")) == {("golden", True)}
    assert any("1 of these queries also appear" in w["reason"] for w in r["warnings"])


@pytest.mark.django_db
def test_unreadable_file_imports_nothing(project, tmp_path):
    path = write(tmp_path, "bad.jsonl", "{not json\n\n{\"id\": 1}\n")
    with pytest.raises(InvalidInput, match=r"bad.jsonl: no query could be read from the file \(3 rows skipped: line 1: malformed JSON"):
        do_import(project, path)
    ds = Dataset.objects.get(project=project)
    assert ds.status == "failed" and "no query could be read" in ds.error
    with pytest.raises(InvalidInput, match="not a text file"):
        do_import(project, write(tmp_path, "x.csv", bytes(range(256)) * 10))
    with pytest.raises(InvalidInput, match="text column: no column 'body'"):
        do_import(project, write(tmp_path, "y.csv", "text\nhello\n"), text_column="body")
    assert Query.objects.count() == 0


@pytest.mark.django_db
def test_import_is_all_or_nothing(project, tmp_path):
    # A UTF-16 file cut in the middle of a character fails at its very end, after rows were copied.
    body = "text\n" + "".join(f"question {i}\n" for i in range(5000))
    path = write(tmp_path, "cut.tsv", b"\xff\xfe" + body.encode("utf-16-le") + b"x")
    with pytest.raises(InvalidInput, match="not valid utf-16"):
        do_import(project, path)
    assert Query.objects.count() == 0
    # A job cancelled while reading: nothing written either.
    path = write(tmp_path, "many.txt", "".join(f"question {i}\n" for i in range(10000)))

    def progress(fraction, message):
        raise JobCancelled()

    with pytest.raises(JobCancelled):
        do_import(project, path, progress=progress)
    assert Query.objects.count() == 0
    assert list(Dataset.objects.values_list("status", flat=True)) == ["failed", "failed"]


@pytest.mark.django_db
def test_viewer_cannot_import(project, viewer, tmp_path):
    with pytest.raises(NotAllowed):
        do_import(project, write(tmp_path, "q.txt", "hello\n"), user=viewer)
    assert Dataset.objects.count() == 0


@pytest.mark.django_db
def test_cli_import_prints_the_report(project, tmp_path, capsys):
    path = write(tmp_path, "q.jsonl", '{"query": "a"}\n{"query": "A "}\n\n{"text": "b", "reference": "x"}\n')
    call_command("distill", "import", "--project", project.slug, str(path), "--json")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["imported"] == 2 and out["duplicates"] == 1 and out["skipped"] == [{"line": 3, "reason": "empty"}]
    assert sum(out["splits"].values()) == 2 and out["golden"] == 0
    with pytest.raises(SystemExit) as exc:
        call_command("distill", "import", "--project", project.slug, str(write(tmp_path, "e.txt", "")), "--json")
    assert exc.value.code == 1 and "e.txt: the file is empty" in capsys.readouterr().err


@pytest.mark.django_db
def test_cli_import_of_deeply_nested_jsonl_exits_1_with_one_line(project, tmp_path, capsys):
    path = write(tmp_path, "deep.jsonl", "[" * 100_000 + "\n")
    with pytest.raises(SystemExit) as exc:
        call_command("distill", "import", "--project", project.slug, str(path))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err == (
        "error: deep.jsonl: no query could be read from the file (1 row skipped: line 1: "
        "malformed JSON: nested more than 32 levels deep)\n")
    path = write(tmp_path, "mixed.jsonl", '{"query": "a"}\n{"query": {"a": ' + "[" * 900 + "]" * 900 + "}}\n")
    call_command("distill", "import", "--project", project.slug, str(path), "--json")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["imported"] == 1 and out["skipped"] == [{"line": 2, "reason": "malformed JSON: nested more than 32 levels deep"}]


# --- pages ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_query_list_search_filter_and_keyset_pages(owner_client, project, tmp_path):
    do_import(project, write(tmp_path, "q.txt", "".join(f"question number {i}\n" for i in range(120)) + "a unique needle here\n"))
    url = reverse("queries_page", kwargs={"slug": project.slug})
    r = owner_client.get(url)
    body = r.content.decode()
    assert r.status_code == 200 and body.count('<td class="text">') == 50 and "a unique needle here" in body
    assert "Older →" in body and "Newer" not in body
    older = r.context["page"]["older"]
    r2 = owner_client.get(url, {"after": older})
    ids2 = [q.id for q in r2.context["page"]["rows"]]
    assert len(ids2) == 50 and max(ids2) < older and r2.context["page"]["newer"] == ids2[0]
    r3 = owner_client.get(url, {"before": r2.context["page"]["newer"]})
    assert [q.id for q in r3.context["page"]["rows"]] == [q.id for q in r.context["page"]["rows"]]
    r = owner_client.get(url, {"q": "NEEDLE"})
    assert [q.text for q in r.context["page"]["rows"]] == ["a unique needle here"]
    r = owner_client.get(url, {"split": "test"})
    rows = r.context["page"]["rows"]
    assert rows and {q.split for q in rows} == {"test"}
    assert len(rows) == Query.objects.filter(project=project, split="test").count()


@pytest.mark.django_db
def test_viewer_cannot_upload_and_oversized_upload_is_413(client, viewer, owner_client, project, settings):
    url = reverse("queries_page", kwargs={"slug": project.slug})
    client.force_login(viewer)
    r = client.post(url, {"file": SimpleUploadedFile("q.txt", b"hello\n")})
    assert r.status_code == 403 and Dataset.objects.count() == 0
    settings.MAX_UPLOAD_MB = 1
    r = owner_client.post(url, {"file": SimpleUploadedFile("big.txt", b"x" * (2 * 1024 * 1024))})
    assert r.status_code == 413 and "larger than the limit of 1 MB" in r.content.decode()
    assert Dataset.objects.count() == 0


@pytest.mark.django_db
def test_dataset_card_is_404_for_another_project(owner_client, project, outsider, other_team, tmp_path):
    secret = project_create(team=other_team, user=outsider, name="Secret", task_type="generation")
    ds = do_import(secret, write(tmp_path, "q.txt", "hello\n"))
    assert owner_client.get(reverse("dataset_card", kwargs={"slug": project.slug, "dataset_id": ds.pk})).status_code == 404
    assert owner_client.get(reverse("dataset_card", kwargs={"slug": secret.slug, "dataset_id": ds.pk})).status_code == 404


def test_browser_upload_runs_on_the_worker(celery_worker, team, owner, client):
    project = project_create(team=team, user=owner, name="Upload", task_type="generation")
    client.force_login(owner)
    url = reverse("queries_page", kwargs={"slug": project.slug})
    data = "query,reference\n" + "".join(f"q{i},r{i}\n" for i in range(500)) + "q1,dup\n"
    for _ in range(2):  # a double-clicked upload
        r = client.post(url, {"file": SimpleUploadedFile("q.csv", data.encode("utf-16"), content_type="text/csv")})
        assert r.status_code == 302
    first, second = Dataset.objects.filter(project=project).order_by("id")
    for ds in (first, second):
        job = wait_job(ds.job_id, timeout=120)
        assert job.status == "succeeded", job.error
    first.refresh_from_db(), second.refresh_from_db()
    assert sorted([(first.imported, first.duplicates), (second.imported, second.duplicates)]) == [(0, 501), (500, 1)]
    assert Query.objects.filter(project=project).count() == 500
    assert Job.objects.get(pk=first.job_id).result["imported"] in (0, 500)
    card = client.get(reverse("dataset_card", kwargs={"slug": project.slug, "dataset_id": first.pk})).content.decode()
    assert "queries imported" in card and "hx-trigger" not in card


def test_a_deeply_nested_upload_ends_with_a_clear_message(celery_worker, team, owner, client):
    project = project_create(team=team, user=owner, name="Deep", task_type="generation")
    client.force_login(owner)
    url = reverse("queries_page", kwargs={"slug": project.slug})
    for name, data in (("deep.jsonl", "[" * 100_000 + "\n"), ("deep.json", "[" * 100_000),
                       ("mixed.jsonl", '{"query": "a"}\n{"query": 1, "x": ' + "[" * 900 + "]" * 900 + "}\n")):
        assert client.post(url, {"file": SimpleUploadedFile(name, data.encode())}).status_code == 302
    deep, deep_doc, mixed = Dataset.objects.filter(project=project).order_by("id")
    job = wait_job(deep.job_id, timeout=120)
    deep.refresh_from_db()
    assert job.status == "failed" and deep.status == "failed"
    assert deep.error == ("no query could be read from the file (1 row skipped: line 1: "
                          "malformed JSON: nested more than 32 levels deep)")
    assert job.message == "Failed: deep.jsonl: " + deep.error
    job = wait_job(deep_doc.job_id, timeout=120)
    deep_doc.refresh_from_db()
    assert job.status == "failed" and deep_doc.error == "malformed JSON: nested too deeply (rows may nest at most 32 levels)"
    job = wait_job(mixed.job_id, timeout=120)
    mixed.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert mixed.imported == 1 and mixed.skipped == [{"line": 2, "reason": "malformed JSON: nested more than 32 levels deep"}]


def test_a_large_upload_reports_progress_from_inside_its_copy(celery_worker, team, owner, client):
    # Progress is reported every 2,000 rows, while the import's COPY holds its connection.
    project = project_create(team=team, user=owner, name="Large", task_type="generation")
    client.force_login(owner)
    data = "query\n" + "".join(f"question number {i}\n" for i in range(9000))
    r = client.post(reverse("queries_page", kwargs={"slug": project.slug}),
                    {"file": SimpleUploadedFile("big.csv", data.encode(), content_type="text/csv")})
    assert r.status_code == 302
    ds = Dataset.objects.get(project=project)
    job = wait_job(ds.job_id, timeout=120)
    assert job.status == "succeeded", job.error
    ds.refresh_from_db()
    assert (ds.imported, ds.duplicates) == (9000, 0) and job.result["message"].startswith("Imported 9,000 queries")


@pytest.mark.django_db(transaction=True)
def test_a_broker_failure_after_commit_keeps_the_import_and_search_catches_up(project, tmp_path, monkeypatch):
    import workers.runs.ingest as ingest
    from projects.models import Project
    from workers.tasks import ingest_search_catch_up_task

    def broker_down(project_id):
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(ingest, "_enqueue_search_index", broker_down)
    ds = do_import(project, write(tmp_path, "q.txt", "first question\nsecond question\n"))
    ds.refresh_from_db()
    assert (ds.status, ds.imported) == ("imported", 2)
    assert Project.objects.values_list("search_version", "search_indexed_version").get(pk=project.pk) == (1, 0)
    assert ingest_search_catch_up_task() == [project.pk]  # the beat task, called here directly
    assert Project.objects.values_list("search_version", "search_indexed_version").get(pk=project.pk) == (1, 1)
    assert ingest_search_catch_up_task() == []


@pytest.mark.django_db(transaction=True)
def test_an_import_waits_for_another_import_of_its_project_and_says_so(project, tmp_path):
    import psycopg
    from django.db import connection

    from workers.runs.ingest import INGEST_LOCK

    params = connection.get_connection_params()
    other = psycopg.connect(**{k: params[k] for k in ("dbname", "user", "password", "host", "port") if params.get(k)})
    other.execute("BEGIN")
    other.execute("SELECT pg_advisory_xact_lock(%s, %s)", [INGEST_LOCK, project.pk])  # an import in progress
    messages, results = [], []

    def run():
        try:
            results.append(do_import(project, write(tmp_path, "q.txt", "hello\n"),
                                     progress=lambda f, m: messages.append(m)))
        finally:
            connection.close()

    t = threading.Thread(target=run)
    t.start()
    # Until the import says it waits (not a fixed 2 s: a loaded machine may take longer to get there).
    deadline = time.time() + 120
    while "Waiting for another import into this project to finish" not in messages and t.is_alive():
        assert time.time() < deadline, messages
        time.sleep(0.05)
    assert t.is_alive() and "Waiting for another import into this project to finish" in messages
    other.execute("COMMIT")  # the other import ends
    t.join(timeout=30)
    other.close()
    assert not t.is_alive() and results[0].imported == 1


@pytest.mark.django_db
def test_project_settings_edit(owner_client, project, viewer, client):
    url = reverse("project_settings", kwargs={"slug": project.slug})
    assert owner_client.get(url).status_code == 200
    form = {"name": "Support intents v2", "task_type": "extraction", "output_schema": '{"type": "objekt"}',
            "few_shot": '{"query": "q", "answer": "a"}', "split_train": "0.7", "split_validation": "0.15", "split_test": "0.15"}
    r = owner_client.post(url, form)
    body = r.content.decode()
    assert r.status_code == 200 and "not a valid JSON Schema" in body
    assert body.index("not a valid JSON Schema") > body.index('name="output_schema"')  # at the field
    form["output_schema"] = '{"type": "object", "properties": {"intent": {"type": "string"}}}'
    assert owner_client.post(url, form).status_code == 302
    project.refresh_from_db()
    assert (project.name, project.task_type, project.split_train, project.few_shot) == (
        "Support intents v2", "extraction", 0.7, [{"query": "q", "answer": "a"}])
    form["few_shot"] = "not json"
    assert "Line 1: not valid JSON" in owner_client.post(url, form).content.decode()
    client.force_login(viewer)
    assert client.post(url, {**form, "few_shot": "", "name": "hacked"}).status_code == 403
    project.refresh_from_db()
    assert project.name == "Support intents v2"


@pytest.mark.django_db
def test_queries_page_shows_each_import_report(owner_client, project, tmp_path):
    with pytest.raises(InvalidInput):
        do_import(project, write(tmp_path, "empty.csv", "text\n\n"))
    do_import(project, write(tmp_path, "ok.jsonl", '{"query": "hello"}\n{"query": "hello"}\nnot json\n'))
    body = owner_client.get(reverse("queries_page", kwargs={"slug": project.slug})).content.decode()
    assert "Not imported (nothing was written): empty.csv: " not in body
    assert "Not imported (nothing was written): no query could be read from the file (1 row skipped: line 2: empty)" in body
    assert "<strong>1</strong> queries imported" in body and "<strong>1</strong> duplicates" in body
    assert "<td>3</td><td>malformed JSON: Expecting value at column 1</td>" in body
