"""The worker floor's execution code, one module per run kind: Django-aware (reads and writes
the rows), called by the thin tasks in ``workers.tasks``; the request side (projects.services)
never imports it and queues tasks by name instead."""
