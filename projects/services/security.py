"""Model references and teacher endpoints checked against the operator's settings: the Django
side of ``workers.pipeline.security`` (which holds the rules and says why).

A model reference (a training run's student, a local teacher's model) is stored as one of:
a bundled short name, a Hugging Face id ``org/name``, ``artifact:<id>`` (a ``merged`` or
``classifier`` ModelArtifact of the SAME project, resolved server-side to its folder), or the
real path of a folder under ``settings.MODEL_DIRS`` (``DISTILLHUB_MODEL_DIRS``). Forms, the CLI
and the services call ``model_ref_check`` when a setting is saved; the worker calls
``model_ref_resolve`` right before it loads the model, which checks everything again.
"""
from __future__ import annotations

from pathlib import Path

from django.conf import settings

from projects.models import ModelArtifact, Project
from projects.services import InvalidInput, InvalidState
from workers.pipeline.security import Refused, SecurityPolicy, check_key_env, check_model_name, check_teacher_url

ARTIFACT_PREFIX = "artifact:"
#: Artifact kinds that are plain Hugging Face folders a student or teacher can start from.
MODEL_ARTIFACT_KINDS = ("merged", "classifier")


def security_policy() -> SecurityPolicy:
    """The operator's policy from the settings (``MODEL_DIRS``, ``TEACHER_KEY_ENVS``,
    ``ALLOW_PRIVATE_TEACHER_URLS``, ``TEACHER_URL_ALLOW``), read on every call so a changed
    setting applies at once."""
    return SecurityPolicy(model_dirs=tuple(str(Path(d).resolve()) for d in settings.MODEL_DIRS),
                          teacher_key_envs=tuple(settings.TEACHER_KEY_ENVS),
                          allow_private_teacher_urls=bool(settings.ALLOW_PRIVATE_TEACHER_URLS),
                          teacher_url_allow=tuple(settings.TEACHER_URL_ALLOW))


def _is_artifact_ref(ref: str) -> bool:
    return (ref or "").strip().lower().startswith(ARTIFACT_PREFIX)


def _artifact(project: Project, ref: str, field: str, kinds: tuple[str, ...]) -> ModelArtifact:
    raw = ref.strip()[len(ARTIFACT_PREFIX):].strip()
    if not raw.isdigit():
        raise InvalidInput(f"{field}: {ref.strip()[:100]!r} is not artifact:<id> (the number of one of this project's artifacts)")
    art = ModelArtifact.objects.filter(pk=int(raw), project=project).first()
    if art is None:
        # The same answer whether the id exists in another project or not at all.
        raise InvalidInput(f"{field}: artifact {int(raw)} is not an artifact of project {project.slug}; "
                           "choose one of this project's own artifacts")
    if art.kind not in kinds:
        raise InvalidInput(f"{field}: artifact {art.pk} is a {art.kind} artifact; use a {' or '.join(kinds)} artifact")
    return art


def artifact_folder(*, artifact: ModelArtifact) -> str:
    """The absolute real path of ``artifact`` under MEDIA_ROOT. Raises InvalidState when its
    stored path leaves the media folder."""
    media = Path(settings.MEDIA_ROOT).resolve()
    path = (media / artifact.path).resolve()
    if media not in path.parents:
        raise InvalidState(f"artifact {artifact.pk}: its path leaves the media folder")
    return str(path)


def model_ref_check(*, project: Project, ref: str, field: str, kinds: tuple[str, ...] = MODEL_ARTIFACT_KINDS) -> str:
    """Check a model reference when it is saved; return the value to store (a bundled name,
    a hub id, ``artifact:<id>`` or a real folder path under ``MODEL_DIRS``). ``kinds``: the
    artifact kinds accepted. Raises InvalidInput naming ``field`` for anything else: another
    project's artifact, a free path, a hub-id-shaped name that exists on disk here."""
    ref = (ref or "").strip()
    if _is_artifact_ref(ref):
        return f"{ARTIFACT_PREFIX}{_artifact(project, ref, field, kinds).pk}"
    try:
        return check_model_name(ref, policy=security_policy(), field=field)
    except Refused as exc:
        raise InvalidInput(str(exc)) from None


def model_ref_resolve(*, project: Project, ref: str, field: str,
                      kinds: tuple[str, ...] = MODEL_ARTIFACT_KINDS) -> tuple[str, SecurityPolicy]:
    """On the worker, right before loading: ``(name or folder to load, the policy that allows
    exactly it)``. ``artifact:<id>`` becomes the artifact's folder (the same project's only);
    anything else must pass the operator's policy as it stands now. Raises InvalidInput naming
    ``field`` (and InvalidState for an artifact whose path leaves the media folder)."""
    policy = security_policy()
    if _is_artifact_ref(ref):
        folder = artifact_folder(artifact=_artifact(project, ref, field, kinds))
        return folder, policy.with_model_dirs(folder)
    try:
        return check_model_name(ref, policy=policy, field=field), policy
    except Refused as exc:
        raise InvalidInput(str(exc)) from None


def project_model_policy(*, project: Project) -> SecurityPolicy:
    """The operator's policy plus the folders of every artifact of ``project`` (for the
    evaluation, which loads them, and adapters whose base is one of them)."""
    folders = []
    for a in ModelArtifact.objects.filter(project=project).order_by("id"):
        try:
            folders.append(artifact_folder(artifact=a))
        except InvalidState:
            continue
    return security_policy().with_model_dirs(*folders)


def teacher_endpoint_check(*, base_url: str, api_key_env: str, on_worker: bool = False) -> None:
    """Check a teacher's ``api_key_env`` (on the operator's list, never a pasted key) and
    ``base_url`` (http/https, every address it resolves to public unless the operator allows
    it). ``on_worker``: a host that does not resolve is refused (when saving it passes; the
    worker checks again). Raises InvalidInput naming the field."""
    policy = security_policy()
    try:
        check_key_env(api_key_env, policy=policy)
        check_teacher_url(base_url, policy=policy, require_resolution=on_worker)
    except Refused as exc:
        raise InvalidInput(str(exc)) from None
