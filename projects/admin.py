from django.contrib import admin

from projects import models

for m in (models.Team, models.Membership, models.Project, models.Dataset, models.Teacher, models.GenerationRun,
          models.TrainingRun, models.Sweep, models.ModelArtifact, models.Evaluation, models.EvalResult, models.Job):
    admin.site.register(m)
