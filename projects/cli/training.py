"""Verb: ``train`` (a student from the curated dataset), plus ``train-resume``."""
from __future__ import annotations

from projects.cli import CliError, finish_job
from projects.cli.foundation import get_project
from projects.models import ModelArtifact, TrainingMethod, TrainingRun
from projects.services.training import training_resume, training_start
from workers.pipeline.json_limits import loads_bounded
from workers.pipeline.student_init import STUDENT_SIZES
from workers.pipeline.training import PRESET_NAMES


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student on the curated dataset (gpu queue)")
    p.add_argument("--project", required=True)
    p.add_argument("--method", required=True, choices=TrainingMethod.values)
    p.add_argument("--student", default="", help="bundled name (smollm2-135m-instruct, minilm-l6), Hugging Face id "
                   "org/name, or artifact:ID of this project (default: the method's); a folder only under the "
                   "operator's DISTILLHUB_MODEL_DIRS")
    p.add_argument("--preset", default="fast", choices=list(PRESET_NAMES))
    p.add_argument("--student-size", default="", choices=["", *STUDENT_SIZES],
                   help="sft-full and logit-kd: the student is the project's local teacher cut to about 10 / 25 / "
                        "50 %% of its layers (light / medium / heavy), then fully fine-tuned; leave --student out")
    p.add_argument("--epochs", type=float, help="num_train_epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter (repeatable), e.g. --set learning_rate=1e-4")
    p.add_argument("--wait", action="store_true", help="block until the run ends")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("train-resume", help="resume a failed or cancelled training run from its last checkpoint")
    p.add_argument("run", type=int)
    p.add_argument("--wait", action="store_true")
    p.set_defaults(handler=cmd_train_resume)


def run_summary(run: TrainingRun) -> dict:
    """``{run, job, status, method, student, student_model, student_size, student_layers,
    teacher_layers, train_loss, best_val_loss, stop_reason, artifacts: [{kind, path, size_bytes,
    sha256}]}`` (paths relative to MEDIA_ROOT). ``student`` is the name people read (e.g.
    ``smollm2-135m-instruct@light (3/30 layers)``), ``student_model`` the model reference."""
    run.refresh_from_db()
    arts = [{"kind": a.kind, "path": a.path, "size_bytes": a.size_bytes, "sha256": a.sha256}
            for a in ModelArtifact.objects.filter(training_run=run).order_by("kind")]
    return {"run": run.pk, "job": run.job_id, "status": run.status, "method": run.method,
            "student": run.student_name, "student_model": run.student_model, "student_size": run.student_size,
            "student_layers": (run.preflight or {}).get("student_layers"),
            "teacher_layers": (run.preflight or {}).get("teacher_layers"), "preset": run.preset, "dataset_rows": run.dataset_rows,
            "dataset_sha256": run.dataset_sha256, "dataset_version": run.dataset_version_id,
            "train_loss": run.train_loss, "best_val_loss": run.best_val_loss,
            "stop_reason": run.stop_reason, "artifacts": arts}


def _finish(o: dict, run: TrainingRun) -> dict:
    return finish_job(o, run.job_id, lambda: run_summary(run), f"training run {run.pk}",
                      lambda: TrainingRun.objects.get(pk=run.pk).stop_reason)


def overrides_from_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as hyperparameter overrides: JSON where it parses (numbers,
    true/false, ["q_proj", "v_proj"]), else the text. Raises CliError for an item without ``=``."""
    overrides: dict = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--set: {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            overrides[k.strip()] = loads_bounded(v)
        except ValueError:
            overrides[k.strip()] = v
    return overrides


def cmd_train(o: dict) -> dict:
    project = get_project(o["project"])
    overrides = overrides_from_sets(o["set"])
    if o.get("epochs") is not None:
        overrides["num_train_epochs"] = o["epochs"]
    run = training_start(project=project, method=o["method"], student_model=o["student"], preset=o["preset"],
                         overrides=overrides, student_size=o.get("student_size") or "")
    return _finish(o, run)


def cmd_train_resume(o: dict) -> dict:
    try:
        run = TrainingRun.objects.get(pk=o["run"])
    except TrainingRun.DoesNotExist:
        raise CliError(f"train-resume: no training run with id {o['run']}") from None
    run = training_resume(run=run)
    return _finish(o, run)
