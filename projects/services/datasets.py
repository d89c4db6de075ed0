"""Dataset versions: the curated dataset frozen as a file when a training run starts, so the
exact rows a student was trained on stay downloadable after later review decisions change the
curated dataset.

A version is written by the one curated-dataset exporter (``review.curated_dataset_export``) in
``VERSION_FORMAT`` to a staging file under ``MEDIA_ROOT/datasets/<project-slug>/`` (itself
written to a temporary file and renamed), then renamed to ``<sha256>.jsonl`` beside it. The
same bytes (sha256) in the same project are one version: a second run on unchanged data reuses
it and the staging file is removed. Nothing half-written ever carries a version's name."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from django.conf import settings
from django.db.models import Max

from projects.models import DatasetVersion, Project
from projects.services import InvalidInput, InvalidState
from projects.services.review import curated_dataset_export

#: The format versions are frozen in: flat rows with query, answer, label, soft labels, teacher
#: and TRL's prompt/completion (see ``projects.selectors.curated_export_lines``).
VERSION_FORMAT = "hf-jsonl"
_CHUNK = 1 << 20


def dataset_version_dir(*, project: Project) -> Path:
    """``MEDIA_ROOT/datasets/<project-slug>``: where the project's versions are kept."""
    return Path(settings.MEDIA_ROOT) / "datasets" / project.slug


def dataset_version_file(*, version: DatasetVersion) -> Path:
    """The absolute path of ``version``'s file. Raises InvalidState when its stored path leaves
    the media folder or the file is missing."""
    media = Path(settings.MEDIA_ROOT).resolve()
    path = (media / version.path).resolve()
    if media not in path.parents:
        raise InvalidState(f"dataset version {version.pk}: its path leaves the media folder")
    if not path.is_file():
        raise InvalidState(f"dataset version {version.pk}: its file {version.path} is missing")
    return path


def dataset_version_freeze(*, project: Project, user=None) -> DatasetVersion:
    """Freeze ``project``'s curated dataset now: export it (``VERSION_FORMAT``) and return the
    version holding exactly those bytes, the existing one when the project already has a
    version with the same sha256 (its ``reused`` is True then), else a new one numbered after
    the project's last. Call it inside the transaction that starts the training run, after the
    project is locked (``idempotency.start_lock``), so two starts never number alike.

    Raises InvalidState when the curated dataset is empty, InvalidInput when the media folder
    cannot be written."""
    folder = dataset_version_dir(project=project)
    staging = folder / f".freeze-{uuid.uuid4().hex}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = curated_dataset_export(project=project, fmt=VERSION_FORMAT, path=staging)
        if out["rows"] == 0:
            raise InvalidState("the curated dataset is empty: generate teacher data (and review it) before training")
        final = folder / f"{out['sha256']}.jsonl"
        existing = DatasetVersion.objects.filter(project=project, sha256=out["sha256"]).first()
        if existing is not None:
            if not final.is_file():  # the file was lost: the staging copy holds the same bytes
                os.replace(staging, final)
            existing.reused = True
            return existing
        os.replace(staging, final)
    except OSError as exc:
        raise InvalidInput(f"media: cannot write the dataset version under {folder}: {exc.strerror or exc}") from None
    finally:
        try:
            staging.unlink(missing_ok=True)
        except OSError:
            pass
    number = (DatasetVersion.objects.filter(project=project).aggregate(m=Max("number"))["m"] or 0) + 1
    version = DatasetVersion.objects.create(
        project=project, number=number, sha256=out["sha256"], rows=out["rows"], size_bytes=final.stat().st_size,
        format=VERSION_FORMAT, path=str(final.relative_to(Path(settings.MEDIA_ROOT))),
        created_by=user if (user is not None and user.is_authenticated) else None)
    version.reused = False
    return version


def dataset_version_export(*, version: DatasetVersion, path: str | os.PathLike) -> dict:
    """Copy ``version``'s file to ``path`` (a temporary file beside it, renamed when complete),
    checking its sha256 on the way. Returns ``{"version": id, "number", "rows", "sha256",
    "format", "path"}``. Raises InvalidState when the stored file is missing or its bytes no
    longer hash to the version's sha256 (nothing is left at ``path`` then), InvalidInput when
    ``path`` cannot be written."""
    from projects.services import InvalidInput

    src = dataset_version_file(version=version)
    out = Path(path).resolve()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
        if h.hexdigest() != version.sha256:
            raise InvalidState(f"dataset version {version.pk}: its file no longer matches sha256 {version.sha256}")
        os.replace(tmp, out)
    except OSError as exc:
        raise InvalidInput(f"out: cannot write {str(out)!r}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"version": version.pk, "number": version.number, "rows": version.rows, "sha256": version.sha256,
            "format": version.format, "path": str(out)}
