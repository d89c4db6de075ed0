"""Training through the service, the real Celery worker, the CLI and the pages: a classifier-kd
run on BANKING77 queries with soft labels, cancel and resume from a checkpoint, the Train form."""
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from projects import selectors
from projects.models import JobStatus, ModelArtifact, Sample, Teacher, TrainingMetric, TrainingRun
from projects.services.training import latest_checkpoint, training_resume, training_start
from workers.runs.training import path_digest
from tests.conftest import wait_job
from tests.training_data import curated_banking  # noqa: F401 (imported from here by other test files)

# Two shared cores: one torch thread each trains several times faster than oversubscribed
# OpenMP (the worker process inherits this at start).
os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")


@pytest.mark.django_db(transaction=True)
def test_train_cli_classifier_kd_through_the_worker(celery_worker, team, owner, shared_data, client, capsys):
    project = curated_banking(team, owner, shared_data)
    call_command("distill", "train", "--project", project.slug, "--method", "classifier-kd", "--student", "minilm-l6",
                 "--epochs", "2", "--set", "per_device_train_batch_size=8", "--wait", "--json")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "succeeded", res
    run = TrainingRun.objects.get(pk=res["run"])
    sha, n = selectors.curated_dataset_sha256(project)
    assert (run.dataset_sha256, run.dataset_rows) == (sha, n) and n == 120
    assert res["train_loss"] == pytest.approx(run.train_loss) and run.train_loss > 0
    assert run.preflight["validation_source"] == "validation-split" and run.preflight["validation_rows"] == 40
    assert run.student_prompt_template == "{query}" and "Classify the banking" in run.teacher_prompt_template
    [art] = res["artifacts"]
    assert art["kind"] == "classifier" and art["path"] == f"artifacts/{project.slug}/run-{run.pk}/classifier"
    from django.conf import settings

    size, digest = path_digest(path=Path(settings.MEDIA_ROOT) / art["path"])
    assert (art["size_bytes"], art["sha256"]) == (size, digest) and size > 10_000_000
    val = list(TrainingMetric.objects.filter(run=run, split="validation").order_by("step"))
    assert len(val) == 2 and all(m.fidelity is not None for m in val)
    assert val[-1].fidelity > 0.3  # 10 labels: chance is 0.1
    assert TrainingMetric.objects.filter(run=run, split="train", grad_norm__isnull=False).count() >= 3
    # The run page: chart, preflight, templates, artifacts with a working download.
    client.force_login(owner)
    page = client.get(reverse("training_run", kwargs={"slug": project.slug, "run_id": run.pk})).content.decode()
    assert "plotly/plotly.min.js" in page and f"loss-chart-{run.pk}" in page and "validation loss" in page
    assert "validation_source" in page and digest in page and "{query}" in page
    assert "hx-get" not in page  # finished: no more polling
    a = ModelArtifact.objects.get(training_run=run)
    assert f"artifact:{a.pk}" in page  # the reference a later run's --student takes
    r = client.get(reverse("training_artifact_download", kwargs={"slug": project.slug, "artifact_id": a.pk}))
    z = zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content)))
    assert any(name.endswith("classifier/config.json") or name.endswith("/config.json") for name in z.namelist())
    cfg = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("/config.json")))
    assert cfg["id2label"]["0"] == project.labels[0]


@pytest.mark.django_db(transaction=True)
def test_cancel_then_resume_from_the_last_checkpoint(celery_worker, team, owner, shared_data):
    project = curated_banking(team, owner, shared_data, n_labels=6, train_per_label=10, val_per_label=2)
    run = training_start(project=project, method="classifier-kd", student_model="minilm-l6", user=owner,
                         overrides={"num_train_epochs": 20, "per_device_train_batch_size": 4, "eval_steps": 15,
                                    "early_stopping_patience": 0, "logging_steps": 1})
    deadline = time.time() + 240
    while latest_checkpoint(run=run) is None:
        assert time.time() < deadline, "no checkpoint was written"
        run.refresh_from_db()
        assert run.status in ("queued", "running"), (run.status, run.stop_reason)
        time.sleep(0.3)
    run.refresh_from_db()
    from projects.services.training import training_cancel

    training_cancel(run=run, user=owner)
    job = wait_job(run.job_id, timeout=120)
    assert job.status == JobStatus.CANCELLED
    run.refresh_from_db()
    assert run.status == "cancelled" and run.stop_reason == "cancelled by user"
    assert not run.artifacts.exists()
    ckpt = latest_checkpoint(run=run)
    ckpt_step = int(ckpt.rsplit("-", 1)[-1])
    # 15 steps an epoch, 20 epochs: long enough that the cancel lands well before the end even
    # on an idle machine (the cancel is seen within ~2 s).
    assert 15 <= ckpt_step < 300
    first_job = run.job_id
    run = training_resume(run=run, user=owner)
    assert run.job_id != first_job and run.status == "queued"
    job = wait_job(run.job_id, timeout=300)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["resumed_from_step"] >= ckpt_step and job.result["global_step"] == 300
    run.refresh_from_db()
    assert run.status == "succeeded" and run.preflight["resume_from_checkpoint"].endswith(f"checkpoint-{ckpt_step}")
    assert run.artifacts.filter(kind="classifier").exists()
    steps = list(TrainingMetric.objects.filter(run=run, split="train").values_list("step", flat=True))
    assert steps == sorted(set(steps)) and steps[-1] == 300


def test_train_form_starts_a_run_and_refuses_bad_input(owner_client, client, viewer, team, owner, shared_data):
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    url = reverse("training_start", kwargs={"slug": project.slug})
    page = owner_client.get(reverse("training_page", kwargs={"slug": project.slug})).content.decode()
    assert ">Train</button>" in page and "lora_r" in page and "q_proj" in page
    r = owner_client.post(url, {"method": "sft-lora", "preset": "fast", "target_modules": "q_proj,bogus",
                                "num_train_epochs": "1"})
    assert r.status_code == 302
    run = TrainingRun.objects.get(project=project)
    assert run.hyperparams["target_modules"] == ["q_proj", "bogus"]  # checked against the model in the worker
    assert run.hyperparams["num_train_epochs"] == 1.0 and run.student_model == "smollm2-135m-instruct"
    assert run.status == "queued" and run.job.kind == "training" and run.job.payload["run_id"] == run.pk
    page = owner_client.get(r["Location"]).content.decode()
    assert "Label: {query}" in page and "hx-get" in page
    r = owner_client.post(url, {"method": "sft-lora", "preset": "fast", "extra": "temperature=2"})
    assert r.status_code == 400 and "is not a setting of sft-lora" in r.content.decode()
    r = owner_client.post(url, {"method": "logit-kd", "preset": "fast"})
    assert r.status_code == 400 and "local (transformers) teacher" in r.content.decode()
    client.force_login(viewer)
    r = client.post(url, {"method": "classifier-kd", "preset": "fast"})
    assert r.status_code == 400 and "read-only" in r.content.decode()
    assert TrainingRun.objects.filter(project=project).count() == 1


def test_out_of_range_and_non_finite_hyperparameters_are_form_errors(owner_client, team, owner, shared_data):
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    url = reverse("training_start", kwargs={"slug": project.slug})

    def errors(**data):
        r = owner_client.post(url, {"method": "classifier-kd", "preset": "fast", **data})
        assert r.status_code == 400
        return {k: list(v) for k, v in r.context["form"].errors.items()}

    assert errors(extra="learning_rate=inf") == {
        "extra": ["hyperparameter 'learning_rate': 'inf' is not a finite number (valid: [1e-08, 1])"]}
    assert errors(extra="warmup_ratio=nan\nnum_train_epochs=1e9") == {
        "extra": ["hyperparameter 'warmup_ratio': 'nan' is not a finite number (valid: [0, 1])"]}
    assert errors(extra="per_device_train_batch_size=1e999999") == {
        "extra": ["hyperparameter 'per_device_train_batch_size': '1e999999' is not a finite number (valid: [1, 1024])"]}
    assert errors(extra="bogus=1") == {
        "extra": ["hyperparameter 'bogus' is not a setting of classifier-kd; settings: activation_checkpointing, "
                  "alpha, early_stopping_patience, eval_steps, feature_weight, gradient_accumulation_steps, "
                  "learning_rate, logging_steps, lr_scheduler_type, max_grad_norm, max_length, max_steps, "
                  "num_train_epochs, per_device_train_batch_size, relation_weight, seed, teacher, temperature, "
                  "warmup_ratio, weight_decay"]}
    assert errors(num_train_epochs="1e9") == {"num_train_epochs": ["Ensure this value is less than or equal to 100."]}
    assert errors(learning_rate="inf") == {"learning_rate": ["Enter a number."]}
    assert errors(lora_r="8") == {"lora_r": ["hyperparameter 'lora_r' is not a setting of classifier-kd; settings: "
                                             "activation_checkpointing, alpha, early_stopping_patience, eval_steps, "
                                             "feature_weight, gradient_accumulation_steps, learning_rate, "
                                             "logging_steps, lr_scheduler_type, max_grad_norm, max_length, "
                                             "max_steps, num_train_epochs, per_device_train_batch_size, "
                                             "relation_weight, seed, teacher, temperature, warmup_ratio, "
                                             "weight_decay"]}
    from projects.services import InvalidInput

    with pytest.raises(InvalidInput, match=r"^hyperparameter 'num_train_epochs' must be in \[0.01, 100\], got 1e\+09"):
        training_start(project=project, method="classifier-kd", user=owner, overrides={"num_train_epochs": 1e9})
    assert not TrainingRun.objects.filter(project=project).exists()


@pytest.mark.django_db(transaction=True)
def test_train_cli_refuses_bad_settings_with_one_line(team, owner, shared_data):
    from tests.test_cli import distill

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    base = ("train", "--project", project.slug, "--method", "classifier-kd")
    cases = {
        ("--set", "learning_rate=inf"): "hyperparameter 'learning_rate': 'inf' is not a finite number (valid: [1e-08, 1])",
        ("--set", "lora_r=1e999999"): "hyperparameter 'lora_r' is not a setting of classifier-kd",
        ("--set", "max_length=1e999999"): "hyperparameter 'max_length': inf is not a finite number (valid: [8, 32768])",
        ("--set", "alpha=NaN"): "hyperparameter 'alpha': nan is not a finite number (valid: [0, 1])",
        ("--set", "seed=" + "[" * 5000): "hyperparameter 'seed': '" + "[" * 5000 + "' is not a valid int",
        ("--epochs", "1e9"): "hyperparameter 'num_train_epochs' must be in [0.01, 100], got 1e+09",
    }
    for args, message in cases.items():
        r = distill(*base, *args)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, (args, r.stderr)
        assert r.stderr.startswith("error: " + message), (args, r.stderr)
    assert not TrainingRun.objects.filter(project=project).exists()


def test_empty_curated_dataset_is_refused(project, owner):
    from projects.services import InvalidState

    with pytest.raises(InvalidState, match="curated dataset is empty"):
        training_start(project=project, method="classifier-kd", user=owner)


def _with_local_teacher(project):
    return Teacher.objects.create(project=project, name="smollm2-teacher", provider="transformers",
                                  model="smollm2-135m-instruct")


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(900)
def test_student_size_light_logit_kd_through_the_worker(celery_worker, team, owner, shared_data, capsys, client):
    """``distill train --student-size light``: the worker cuts the local SmolLM2 teacher to 3 of
    its 30 layers, distills it (full fine-tuning, a couple of steps) and saves a 3-layer model."""
    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    _with_local_teacher(project)
    call_command("distill", "train", "--project", project.slug, "--method", "logit-kd", "--student-size", "light",
                 "--set", "max_steps=2", "--set", "per_device_train_batch_size=4", "--set", "max_length=96",
                 "--wait", "--json")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "succeeded", res
    run = TrainingRun.objects.get(pk=res["run"])
    assert res["student"] == run.student_name == "smollm2-135m-instruct@light (3/30 layers)"
    assert (res["student_model"], res["student_size"], res["student_layers"], res["teacher_layers"]) == (
        "smollm2-135m-instruct", "light", 3, 30)
    assert run.hyperparams["student_size"] == "light" and run.hyperparams["teacher"] == "smollm2-teacher"
    assert run.hyperparams["learning_rate"] == 5e-5  # full fine-tuning: sft-full's rate, not LoRA's 1e-3
    assert run.preflight["student_layer_indices"] == [0, 15, 29]
    assert run.preflight["student_parameters"] < run.preflight["teacher_parameters"] / 3
    kinds = {a["kind"]: a for a in res["artifacts"]}
    assert set(kinds) == {"merged", "int8"}  # full fine-tuning: no LoRA adapter
    from django.conf import settings

    merged = Path(settings.MEDIA_ROOT) / kinds["merged"]["path"]
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["distillhub_student"]["layer_indices"] == [0, 15, 29]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert len(model.model.layers) == 3
    assert kinds["merged"]["size_bytes"] < 200_000_000  # the 30-layer teacher is about 540 MB in fp32
    client.force_login(owner)
    page = client.get(reverse("training_run", kwargs={"slug": project.slug, "run_id": run.pk})).content.decode()
    assert "smollm2-135m-instruct@light (3/30 layers)" in page and "0, 15, 29" in page


@pytest.mark.django_db(transaction=True)
def test_student_size_is_refused_clearly(owner_client, team, owner, shared_data):
    from projects.services import InvalidInput
    from tests.test_cli import distill

    project = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    with pytest.raises(InvalidInput, match=r"^student_size: only for sft-full and logit-kd .*not classifier-kd"):
        training_start(project=project, method="classifier-kd", user=owner, student_size="light")
    with pytest.raises(InvalidInput, match=r"^student_size: 'tiny' is not one of light, medium, heavy"):
        training_start(project=project, method="sft-full", user=owner, student_size="tiny")
    # No local teacher (this project's teacher is an API one): nothing to cut layers from.
    with pytest.raises(InvalidInput, match=r"^student_size: 'medium' builds the student from a local"):
        training_start(project=project, method="sft-full", user=owner, student_size="medium")
    r = distill("train", "--project", project.slug, "--method", "sft-full", "--student-size", "heavy")
    assert r.returncode == 1 and r.stderr.startswith("error: student_size: 'heavy' builds the student from a local")
    url = reverse("training_start", kwargs={"slug": project.slug})
    r = owner_client.post(url, {"method": "classifier-kd", "preset": "fast", "student_size": "light"})
    assert r.status_code == 400
    assert r.context["form"].errors["student_size"] == [
        "Student sizes are for sft-full and logit-kd (the student is the local teacher cut to fewer layers), "
        "not classifier-kd."]
    _with_local_teacher(project)
    r = owner_client.post(url, {"method": "sft-full", "preset": "fast", "student_size": "light",
                                "student_model": "minilm-l6"})
    assert r.status_code == 400 and "Leave the student model blank" in r.context["form"].errors["student_size"][0]
    with pytest.raises(InvalidInput, match=r"^student_model: leave it blank with student_size"):
        training_start(project=project, method="sft-full", user=owner, student_size="light", student_model="minilm-l6")
    assert not TrainingRun.objects.filter(project=project).exists()
    # With the local teacher, the form queues a sized sft-full run named after its preset.
    page = owner_client.get(reverse("training_page", kwargs={"slug": project.slug})).content.decode()
    assert 'name="student_size"' in page and "about 10 % of the teacher" in page
    r = owner_client.post(url, {"method": "sft-full", "preset": "fast", "student_size": "medium"})
    assert r.status_code == 302
    run = TrainingRun.objects.get(project=project)
    assert (run.student_model, run.student_size, run.student_name) == (
        "smollm2-135m-instruct", "medium", "smollm2-135m-instruct@medium")
    assert run.hyperparams["learning_rate"] == 5e-5 and "teacher" not in run.hyperparams


def _with_api_logprobs(project):
    """Give every sample of ``project`` an API teacher's stored top-3 token_logprobs of its answer."""
    import math

    for s in Sample.objects.filter(run__project=project):
        s.token_logprobs = [{"token": s.response, "logprob": math.log(0.9),
                             "top": [[s.response, math.log(0.9)], ["x", math.log(0.06)], ["y", math.log(0.02)]]}]
        s.save(update_fields=["token_logprobs"])


@pytest.mark.django_db
def test_logit_kd_teacher_choice_for_cross_tokenizer_runs(team, owner, shared_data):
    from projects.services import InvalidInput
    from workers.runs.training import training_rows

    project = curated_banking(team, owner, shared_data, n_labels=2, train_per_label=3, val_per_label=0)
    # An API teacher only: plain logit-kd is refused with the pointer to the new option
    with pytest.raises(InvalidInput, match="uld_weight > 0 and teacher=samples"):
        training_start(project=project, method="logit-kd", user=owner)
    with pytest.raises(InvalidInput, match="no curated sample has them"):
        training_start(project=project, method="logit-kd", user=owner, overrides={"uld_weight": 1})
    with pytest.raises(InvalidInput, match="needs uld_weight > 0"):
        training_start(project=project, method="logit-kd", user=owner, overrides={"teacher": "samples"})
    _with_api_logprobs(project)
    edited = Sample.objects.filter(run__project=project).order_by("id").first()
    edited.edited_response, edited.review_status = "something else", "accepted"
    edited.save(update_fields=["edited_response", "review_status"])
    run = training_start(project=project, method="logit-kd", user=owner, overrides={"uld_weight": 1})
    assert run.hyperparams["teacher"] == "samples" and run.hyperparams["uld_weight"] == 1.0
    rows, _val, _src = training_rows(run=run)
    assert len(rows) == 6
    # The edited answer no longer matches the teacher's tokens: its log-probabilities stay behind
    assert [r.token_logprobs is None for r in rows] == [True] + [False] * 5
    assert rows[1].token_logprobs[0]["top"][1][0] == "x"


@pytest.mark.django_db(transaction=True)
def test_cross_tokenizer_logit_kd_from_api_logprobs_through_the_worker(celery_worker, team, owner, shared_data,
                                                                       capsys):
    project = curated_banking(team, owner, shared_data, n_labels=2, train_per_label=4, val_per_label=0)
    _with_api_logprobs(project)
    call_command("distill", "train", "--project", project.slug, "--method", "logit-kd", "--set", "uld_weight=1",
                 "--set", "max_steps=2", "--set", "per_device_train_batch_size=4", "--set", "logging_steps=1",
                 "--wait", "--json")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "succeeded", res
    run = TrainingRun.objects.get(pk=res["run"])
    assert run.preflight["teacher_source"] == "samples' top_logprobs" and run.preflight["teacher_top_k"] == 3
    assert run.preflight["rows_with_teacher_distributions"] == 8
    assert set(run.preflight["loss_components_last"]) == {"ce", "uld"}
    assert TrainingMetric.objects.filter(run=run, split="train").count() == 2
    assert {a["kind"] for a in res["artifacts"]} == {"adapter", "merged", "int8"}


@pytest.mark.django_db
def test_classifier_kd_feature_weight_is_refused_without_a_local_teacher(team, owner, shared_data):
    from projects.services import InvalidInput

    project = curated_banking(team, owner, shared_data, n_labels=2, train_per_label=3, val_per_label=0)
    # An API teacher only: the hidden-state term has nothing to match, named in the refusal
    with pytest.raises(InvalidInput, match=r"^feature_weight > 0 \(classifier-kd\) matches a local"):
        training_start(project=project, method="classifier-kd", user=owner, overrides={"feature_weight": 1})
    assert not TrainingRun.objects.filter(project=project).exists()
    # The relation term compares the soft labels: fine with an API teacher, no teacher recorded
    run = training_start(project=project, method="classifier-kd", user=owner, overrides={"relation_weight": 2})
    assert run.hyperparams["relation_weight"] == 2.0 and run.hyperparams["teacher"] == ""
    _with_local_teacher(project)
    run = training_start(project=project, method="classifier-kd", user=owner, overrides={"feature_weight": 0.5})
    assert run.hyperparams["teacher"] == "smollm2-teacher" and run.hyperparams["feature_weight"] == 0.5


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(900)
def test_classifier_kd_feature_and_relation_through_the_worker(celery_worker, team, owner, shared_data, capsys):
    """The worker resolves the local teacher for classifier-kd with feature_weight > 0: SmolLM2's
    mean-pooled query states (576-d) are matched through the projection, the relation term on the
    soft labels, and the run records both components."""
    project = curated_banking(team, owner, shared_data, n_labels=2, train_per_label=3, val_per_label=1)
    _with_local_teacher(project)
    call_command("distill", "train", "--project", project.slug, "--method", "classifier-kd", "--student", "minilm-l6",
                 "--set", "max_steps=2", "--set", "per_device_train_batch_size=6", "--set", "logging_steps=1",
                 "--set", "feature_weight=0.5", "--set", "relation_weight=2", "--wait", "--json")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["status"] == "succeeded", res
    run = TrainingRun.objects.get(pk=res["run"])
    assert run.hyperparams["teacher"] == "smollm2-teacher"
    assert run.preflight["kd_losses"] == ["response", "feature", "relation"] and run.preflight["teacher_hidden"] == 576
    last = run.preflight["loss_components_last"]
    assert set(last) == {"response", "feature", "relation"} and last["feature"] > 0 and last["relation"] > 0
