"""Curated teacher data for training tests and benchmarks, without pytest: BANKING77 queries
from ../shared/data with gold labels as teacher answers."""
import csv

from projects.models import GenerationRun, Query, Sample, Teacher
from projects.services.projects import project_create


def curated_banking(team, user, shared_data, *, n_labels=10, train_per_label=12, val_per_label=4):
    """A classification project whose curated dataset is BANKING77 queries answered with their
    gold labels, soft labels 0.7 on the gold label and the rest spread evenly."""
    rows = list(csv.DictReader(open(shared_data / "banking77" / "train.csv", encoding="utf-8")))
    labels = sorted({r["category"] for r in rows})[:n_labels]
    project = project_create(team=team, user=user, name="Banking intents", task_type="classification",
                             labels=labels, instructions="Classify the banking customer's message.")
    teacher = Teacher.objects.create(project=project, name="gold-teacher", provider="openai", model="gpt-x")
    gen = GenerationRun.objects.create(project=project, status="succeeded")
    gen.teachers.add(teacher)
    counts = {l: 0 for l in labels}
    for i, r in enumerate(rows):
        c = r["category"]
        if c not in counts or counts[c] >= train_per_label + val_per_label:
            continue
        split = "train" if counts[c] < train_per_label else "validation"
        counts[c] += 1
        q = Query.objects.create(project=project, text=r["text"], text_hash=f"h{i}", split=split, reference=c)
        probs = {l: (0.7 if l == c else 0.3 / (len(labels) - 1)) for l in labels}
        Sample.objects.create(run=gen, query=q, teacher=teacher, response=c, parsed=c, label_probs=probs,
                              status="accepted")
    return project
