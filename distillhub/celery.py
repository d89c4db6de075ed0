"""The Celery app: queues ``default`` (bookkeeping, ingest), ``teacher`` (generation chunks)
and ``gpu`` (training and evaluation; run its worker with ``--concurrency 1
--max-tasks-per-child 1`` so each job gets a fresh process and GPU memory is returned)."""
import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillhub.settings")

app = Celery("distillhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = (Queue("default"), Queue("teacher"), Queue("gpu"))
app.conf.task_routes = {
    "workers.tasks.generation_*": {"queue": "teacher"},
    "workers.tasks.training_*": {"queue": "gpu"},
    "workers.tasks.evaluation_*": {"queue": "gpu"},
}
app.autodiscover_tasks(["workers"])
