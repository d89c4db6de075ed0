"""Every page's URL; each page group's module under views/ exports its own ``urlpatterns``."""
from projects.views import deployments, evaluation, generation, jobs, projects, queries, review, sweeps, training

urlpatterns = [
    *projects.urlpatterns,
    *jobs.urlpatterns,
    *queries.urlpatterns,
    *generation.urlpatterns,
    *review.urlpatterns,
    *training.urlpatterns,
    *sweeps.urlpatterns,
    *evaluation.urlpatterns,
    *deployments.urlpatterns,
]
