"""The Celery app: queues ``default`` (bookkeeping, ingest), ``teacher`` (generation chunks)
and ``gpu`` (training and evaluation; run its worker with ``--concurrency 1
--max-tasks-per-child 1`` so each job gets a fresh process and GPU memory is returned)."""
import os

from celery import Celery
from celery.signals import worker_process_init
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


@worker_process_init.connect
def _cap_torch_threads(**_kwargs) -> None:
    """``DISTILLHUB_TORCH_THREADS=N`` caps torch's CPU threads in every worker process: several
    worker processes on a small CPU otherwise oversubscribe its cores and run many times slower."""
    n = os.environ.get("DISTILLHUB_TORCH_THREADS")
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))
