"""The serving gateway: an OpenAI-compatible ASGI app (Starlette under uvicorn) that A/B-routes
each request of a deployment between its student and its teacher, falls back to the teacher on
low-confidence or failing student answers, shadows a share of student answers to the teacher,
and logs every request to Postgres in batches. Stateless: run more copies to scale.

Modules: ``app`` (the ASGI app), ``state`` (keys and deployments cached in memory, refreshed from
Postgres in the background), ``routing`` (pure routing, confidence and agreement rules),
``upstream`` (async calls to OpenAI-compatible endpoints and the in-process classifier),
``logbuffer`` (batched request logging), ``student`` (``distill serve-student``)."""
