"""Dataset versions (projects/services/datasets.py): the curated dataset frozen when a training
run starts, shared by runs on unchanged data, a new version after a review decision, the listing
and download (team-scoped), and ``distill dataset-versions`` / ``distill export --version``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.urls import reverse

from projects.models import DatasetVersion, TrainingRun
from projects.services import InvalidState
from projects.services.datasets import dataset_version_freeze
from projects.services.review import curated_dataset_export, review_decide
from projects.services.training import training_start
from tests.review_data import make_samples


@pytest.fixture
def media(settings, tmp_path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def _curated(project):
    return make_samples(project, [
        {"query": "My card has not arrived", "response": "card_arrival", "parsed": "card_arrival",
         "label_probs": {"card_arrival": 0.8, "lost_or_stolen_card": 0.1, "refund_not_showing_up": 0.1}},
        {"query": "Somebody stole my card", "response": "lost_or_stolen_card", "parsed": "lost_or_stolen_card"},
        {"query": "Where is my refund?", "response": "refund_not_showing_up", "parsed": "refund_not_showing_up"},
    ])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.django_db
def test_runs_on_unchanged_data_share_a_version_and_a_review_decision_makes_a_new_one(project, owner, media, tmp_path):
    samples = _curated(project)
    run1 = training_start(project=project, method="classifier-kd", user=owner, preset="seed")
    run2 = training_start(project=project, method="classifier-kd", user=owner, preset="fast")
    assert run1.pk != run2.pk and not run2.reused
    v1 = run1.dataset_version
    assert v1 is not None and run2.dataset_version_id == v1.pk and DatasetVersion.objects.count() == 1
    assert (v1.number, v1.rows, v1.format, v1.created_by) == (1, 3, "hf-jsonl", owner)
    # The frozen file is the exporter's bytes, named by their sha256, under MEDIA_ROOT.
    path = Path(media) / v1.path
    assert v1.path == f"datasets/{project.slug}/{v1.sha256}.jsonl"
    export = curated_dataset_export(project=project, fmt="hf-jsonl", path=tmp_path / "now.jsonl")
    assert path.read_bytes() == (tmp_path / "now.jsonl").read_bytes() and sha(path) == v1.sha256 == export["sha256"]
    assert v1.size_bytes == path.stat().st_size and v1.size_bytes > 300

    review_decide(sample=samples[1], user=owner, decision="reject", expected_version=0)
    run3 = training_start(project=project, method="classifier-kd", user=owner, preset="seed",
                          overrides={"num_train_epochs": 2})
    v2 = run3.dataset_version
    assert v2.pk != v1.pk and (v2.number, v2.rows) == (2, 2) and v2.sha256 != v1.sha256
    assert sha(Path(media) / v2.path) == v2.sha256
    assert sha(path) == v1.sha256  # the older version is untouched
    # Nothing half-written is left beside the versions.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([f"{v1.sha256}.jsonl", f"{v2.sha256}.jsonl"])
    assert list(TrainingRun.objects.filter(dataset_version=v1).order_by("id").values_list("id", flat=True)) == [run1.pk, run2.pk]

    # Accepting it again gives the first version's bytes back: that version is reused.
    review_decide(sample=samples[1], user=owner, decision="accept", expected_version=1)
    run4 = training_start(project=project, method="classifier-kd", user=owner, preset="seed",
                          overrides={"num_train_epochs": 3})
    assert run4.dataset_version_id == v1.pk and DatasetVersion.objects.count() == 2


@pytest.mark.django_db
def test_freezing_an_empty_dataset_is_refused_and_writes_nothing(project, media):
    with pytest.raises(InvalidState, match="the curated dataset is empty"):
        dataset_version_freeze(project=project)
    assert DatasetVersion.objects.count() == 0
    assert list((Path(media) / "datasets" / project.slug).iterdir()) == []


@pytest.mark.django_db
def test_listing_and_download_hash_to_the_listed_sha256_and_other_teams_get_404(client, project, owner, viewer,
                                                                                  outsider, media):
    _curated(project)
    run = training_start(project=project, method="classifier-kd", user=owner)
    v = run.dataset_version
    client.force_login(viewer)  # read-only members may look and download
    page = client.get(reverse("training_page", args=[project.slug]))
    assert page.status_code == 200
    html = page.content.decode()
    assert f'id="dataset-version-{v.pk}"' in html and v.sha256 in html
    assert reverse("training_run", args=[project.slug, run.pk]) in html
    url = reverse("dataset_version_download", args=[project.slug, v.pk])
    assert url in html
    r = client.get(url)
    assert r.status_code == 200
    body = b"".join(r.streaming_content)
    assert hashlib.sha256(body).hexdigest() == v.sha256 and len(body.splitlines()) == v.rows == 3
    assert r["Content-Disposition"] == f'attachment; filename="{project.slug}-dataset-v1-{v.sha256[:12]}.jsonl"'
    # The run page links its version.
    assert url in client.get(reverse("training_run", args=[project.slug, run.pk])).content.decode()

    client.force_login(outsider)
    assert client.get(url).status_code == 404
    # Their own project's URL with our version's id: 404 too (the version is looked up in the project).
    from projects.services.projects import project_create

    theirs = project_create(team=outsider.memberships.get().team, user=outsider, name="Theirs",
                            task_type="generation")
    assert client.get(reverse("dataset_version_download", args=[theirs.slug, v.pk])).status_code == 404


@pytest.mark.django_db(transaction=True)
def test_cli_dataset_versions_and_export_version(project, owner, tmp_path, settings):
    from tests.test_cli import distill as _distill, last_json

    data_dir = tmp_path / "data"
    settings.MEDIA_ROOT = data_dir / "media"

    def distill(*args):
        return _distill(*args, env={"DISTILLHUB_DATA_DIR": str(data_dir)})

    _curated(project)
    v = dataset_version_freeze(project=project, user=owner)
    r = distill("dataset-versions", "--project", project.slug, "--json")
    assert r.returncode == 0, r.stderr
    listed = last_json(r)
    assert listed["project"] == project.slug
    assert [{k: x[k] for k in ("id", "version", "sha256", "rows", "format", "path", "runs")} for x in listed["versions"]] == [
        {"id": v.pk, "version": 1, "sha256": v.sha256, "rows": 3, "format": "hf-jsonl", "path": v.path, "runs": []}]

    out = tmp_path / "v1.jsonl"
    r = distill("export", "--version", str(v.pk), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert last_json(r) == {"version": v.pk, "number": 1, "rows": 3, "sha256": v.sha256, "format": "hf-jsonl",
                            "path": str(out)}
    assert sha(out) == v.sha256

    r = distill("export", "--version", "999999", "--out", str(tmp_path / "x.jsonl"))
    assert (r.returncode, r.stderr) == (1, "error: --version: no dataset version with id 999999\n")
    r = distill("export", "--version", str(v.pk), "--project", project.slug, "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2
    # A file changed on disk is refused, and nothing is written.
    stored = Path(settings.MEDIA_ROOT) / v.path
    stored.write_bytes(stored.read_bytes() + b"{}\n")
    r = distill("export", "--version", str(v.pk), "--out", str(tmp_path / "bad.jsonl"))
    assert (r.returncode, r.stderr) == (1, f"error: dataset version {v.pk}: its file no longer matches sha256 {v.sha256}\n")
    assert not (tmp_path / "bad.jsonl").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["classifier-kd", "sft-lora"])
def test_a_run_trains_on_its_frozen_version_not_on_later_review_decisions(project, owner, media, method):
    from projects import selectors
    from workers.runs.training import _rows_from_samples, training_rows

    samples = _curated(project)
    before = _rows_from_samples(list(selectors.curated_samples(project)), method, project.labels)
    run = training_start(project=project, method=method, user=owner, preset="seed")
    review_decide(sample=samples[0], user=owner, decision="edit", edited_response="lost_or_stolen_card",
                  expected_version=0)
    review_decide(sample=samples[2], user=owner, decision="reject", expected_version=0)
    now = _rows_from_samples(list(selectors.curated_samples(project)), method, project.labels)
    assert len(now) == 2 and len(before) == 3
    train, val, source = training_rows(run=TrainingRun.objects.get(pk=run.pk))
    assert source == "holdout" and sorted(train + val, key=lambda r: r.query) == sorted(before, key=lambda r: r.query)
    first = next(r for r in train + val if r.query == "My card has not arrived")
    assert first.answer == "card_arrival"
    if method == "sft-lora":  # the edit is in the curated dataset now, not in the run's rows
        assert next(r for r in now if r.query == "My card has not arrived").answer == "lost_or_stolen_card"
    if method == "classifier-kd":
        assert first.label_probs == {"card_arrival": 0.8, "lost_or_stolen_card": 0.1, "refund_not_showing_up": 0.1}
    # A version file changed on disk fails the run's rows with the reason.
    path = Path(media) / run.dataset_version.path
    path.write_bytes(path.read_bytes().replace(b"card_arrival", b"card_arrivel"))
    with pytest.raises(InvalidState, match="no longer matches sha256"):
        training_rows(run=TrainingRun.objects.get(pk=run.pk))


@pytest.mark.django_db(transaction=True)
def test_two_training_starts_at_once_freeze_one_version(project, owner, media, monkeypatch):
    """Two starts of different settings on the same data, in two threads (two connections) at
    once: both runs link to one version numbered 1, no unique-constraint error. Their training
    tasks are not queued (a worker left running by another test would train them)."""
    import threading

    from django.db import connection

    monkeypatch.setattr("projects.services.training._enqueue", lambda job: None)
    _curated(project)
    barrier, results = threading.Barrier(2), {}

    def start(preset: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[preset] = training_start(project=project, method="classifier-kd", user=owner, preset=preset)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[preset] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=start, args=(p,)) for p in ("seed", "fast")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, TrainingRun) for r in results.values()), results
    [version] = DatasetVersion.objects.all()
    assert version.number == 1 and {r.dataset_version_id for r in results.values()} == {version.pk}
    assert sha(Path(media) / version.path) == version.sha256
    assert sorted(p.name for p in (Path(media) / version.path).parent.iterdir()) == [f"{version.sha256}.jsonl"]


@pytest.mark.django_db
def test_a_media_folder_that_cannot_be_written_is_a_clear_error(project, owner, settings, tmp_path):
    """The docstring's InvalidInput, not an OSError (a 500 on the Train page) from making the
    versions' folder; no run is created."""
    from projects.services import InvalidInput

    _curated(project)
    (tmp_path / "not-a-folder").write_text("x")
    settings.MEDIA_ROOT = tmp_path / "not-a-folder" / "media"
    with pytest.raises(InvalidInput, match=r"^media: cannot write the dataset version under .*not-a-folder/media/"
                                           rf"datasets/{project.slug}"):
        training_start(project=project, method="classifier-kd", user=owner)
    assert not DatasetVersion.objects.exists() and not TrainingRun.objects.exists()
