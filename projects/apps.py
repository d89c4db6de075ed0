from django.apps import AppConfig


class ProjectsConfig(AppConfig):
    name = "projects"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # How each job kind's end reaches its subject row, registered in every process that sets
        # Django up: the stale-job check (beat's task, in whichever worker takes it) and Cancel
        # (in the web app or the CLI) end the subject with its job even where that kind's task
        # never ran. Bulk review and the self-test have no subject row.
        from projects.services import evaluation, generation, ingest, training
        from projects.services.jobs import job_subject_syncs_register

        job_subject_syncs_register(syncs={
            ingest.JOB_KIND: ingest._sync_dataset,
            generation.JOB_KIND: generation._sync_run_with_job,
            training.JOB_KIND: training._sync_run,
            "evaluation": evaluation._sync_evaluation,
        })
