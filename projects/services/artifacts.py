"""Model artifacts, request side: export a merged student to GGUF for llama.cpp.

The export runs in the caller's process (the ``distill export-gguf`` command): for the students
this product trains (up to a few hundred million parameters) it takes seconds; the pure
conversion is ``workers.pipeline.gguf_export``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction

from projects.models import ModelArtifact
from projects.services import InvalidInput, InvalidState
from projects.services.permissions import ensure_can_write
from projects.services.security import artifact_folder
from projects.services.training import run_output_dir
from workers.pipeline.gguf_export import OUTTYPES, ExportRefused, export_gguf

GGUF_KIND = "gguf"
#: Artifact kinds GGUF export takes: a plain Hugging Face causal-LM folder.
EXPORTABLE_KINDS = ("merged",)


def artifact_export_gguf(*, artifact: ModelArtifact, outtype: str = "f16", copy_to: str | None = None,
                         user=None) -> ModelArtifact:
    """Convert ``artifact`` (a ``merged`` causal-LM artifact of a training run, Llama
    architecture) to one GGUF file ``student-<outtype>.gguf`` in its run's artifact folder and
    record it as the run's ``gguf`` artifact (size in bytes, sha256 of the file); a run has one
    GGUF, so exporting again (e.g. another ``outtype``) replaces it and its file. ``outtype``:
    ``f32``, ``f16`` or ``q8_0``. ``copy_to``: a path where a copy of the file is also written
    (the operator's, from the CLI). Returns the ``gguf`` ModelArtifact.

    Raises NotAllowed (viewer), InvalidInput (an unknown ``outtype``; an artifact of another
    kind; an unsupported architecture, RoPE type or tokenizer, with the converter's reason),
    InvalidState (its files are missing or leave the media folder); InvalidInput naming ``out``
    when ``copy_to`` is a folder or cannot be written (checked before converting; a copy that
    fails midway leaves no file at ``copy_to``)."""
    ensure_can_write(user=user, team=artifact.project.team)
    if outtype not in OUTTYPES:
        raise InvalidInput(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    dest = _copy_target(copy_to) if copy_to else None
    if artifact.kind not in EXPORTABLE_KINDS:
        raise InvalidInput(f"artifact {artifact.pk} is a {artifact.kind!r} artifact; GGUF export takes a "
                           f"{' or '.join(EXPORTABLE_KINDS)} causal-LM artifact (an sft-lora, sft-full or logit-kd "
                           "run's merged student)")
    run = artifact.training_run
    if run is None:
        raise InvalidInput(f"artifact {artifact.pk} belongs to no training run")
    folder = Path(artifact_folder(artifact=artifact))
    if not folder.is_dir():
        raise InvalidState(f"artifact {artifact.pk}: its folder {artifact.path} is missing under the media folder")
    out = run_output_dir(run=run) / f"student-{outtype}.gguf"
    try:
        res = export_gguf(folder, out, outtype=outtype, name=f"{run.project.slug} run {run.pk} student")
    except ExportRefused as exc:
        raise InvalidInput(f"artifact {artifact.pk}: {exc}") from None
    rel = os.path.relpath(out, Path(settings.MEDIA_ROOT))
    with transaction.atomic():
        old = ModelArtifact.objects.select_for_update().filter(training_run=run, kind=GGUF_KIND).first()
        gguf, _ = ModelArtifact.objects.update_or_create(training_run=run, kind=GGUF_KIND, defaults={
            "project": run.project, "path": rel, "size_bytes": res.size_bytes, "sha256": res.sha256})
    if old is not None and old.path != rel:
        try:  # the earlier export (another outtype) is no longer any artifact's file
            Path(artifact_folder(artifact=old)).unlink(missing_ok=True)
        except InvalidState:
            pass
    if dest is not None and dest != out.resolve():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(out, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise InvalidInput(f"out: {str(copy_to)!r} cannot write: {exc.strerror or exc}; the export itself "
                               f"is artifact:{gguf.pk}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return gguf


def _copy_target(copy_to: str) -> Path:
    """``copy_to`` resolved, its folder created; InvalidInput naming ``out`` when it is a folder
    or its folder cannot be made or written."""
    dest = Path(copy_to).expanduser()
    if dest.is_dir():
        raise InvalidInput(f"out: {str(copy_to)!r} is a folder; give the path of the .gguf file to write")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"out: {str(copy_to)!r} cannot write: {exc.strerror or exc}") from None
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise InvalidInput(f"out: {str(copy_to)!r} cannot write: its folder is not writable")
    return dest.resolve()
