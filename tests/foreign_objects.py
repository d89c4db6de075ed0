"""Objects owned by another team, one per URL parameter, for tests/test_access.py. Each area
fills in its own function with the ids its URLs take (e.g. ``{"run_id": ...}``)."""
from __future__ import annotations


def foreign_ids(*, project, team, user) -> dict:
    ids: dict = {}
    for fn in (_ingest, _generation, _review, _training, _evaluation, _serving):
        ids.update(fn(project=project, team=team, user=user))
    return ids


def _ingest(*, project, team, user) -> dict:
    from projects.models import Dataset

    dataset = Dataset.objects.create(project=project, name="secret.csv", status="imported")
    return {"dataset_id": dataset.pk}


def _generation(*, project, team, user) -> dict:
    from projects.models import GenerationRun
    from projects.services.generation import teacher_create

    teacher = teacher_create(project=project, name="their teacher", provider="transformers", user=user)
    run = GenerationRun.objects.create(project=project)
    run.teachers.set([teacher])
    return {"teacher_id": teacher.pk, "run_id": run.pk}


def _review(*, project, team, user) -> dict:
    from tests.review_data import make_samples

    sample = make_samples(project, [{"query": "their secret query", "failed": [("label_in_set", "not a label")]}])[0]
    return {"sample_id": sample.pk}


def _training(*, project, team, user) -> dict:
    from projects.models import DatasetVersion, ModelArtifact, Sweep, TrainingRun

    version = DatasetVersion.objects.create(project=project, number=1, sha256="0" * 64, rows=1, format="hf-jsonl",
                                            path=f"datasets/{project.slug}/{'0' * 64}.jsonl")
    run = TrainingRun.objects.create(project=project, method="sft-lora", student_model="smollm2-135m-instruct",
                                     dataset_version=version)
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="adapter",
                                       path=f"artifacts/{project.slug}/run-{run.pk}/adapter")
    sweep = Sweep.objects.create(project=project, method="sft-lora", student_model="smollm2-135m-instruct",
                                 search="grid", space={"learning_rate": {"values": [1e-4]}}, n_trials=1,
                                 study_name=f"distillhub-{project.slug}-foreign", status="running")
    return {"run_id": run.pk, "artifact_id": art.pk, "version_id": version.pk, "sweep_id": sweep.pk}


def _evaluation(*, project, team, user) -> dict:
    from projects.models import Evaluation

    ev = Evaluation.objects.create(project=project, split="test")
    return {"evaluation_id": ev.pk}


def _serving(*, project, team, user) -> dict:
    from projects.models import ModelArtifact, TrainingRun
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create

    teacher = teacher_create(project=project, name="their served teacher", provider="openai", model="gpt-4o-mini",
                             api_key_env="OPENAI_API_KEY", user=user)
    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6")
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier",
                                       path=f"artifacts/{project.slug}/run-{run.pk}/classifier")
    deployment = deployment_create(project=project, name="their deployment", teacher=teacher, user=user,
                                   student_artifact=art)
    key, _raw = gateway_key_create(team=team, name="their key", user=user)
    return {"deployment_id": deployment.pk, "key_id": key.pk}
