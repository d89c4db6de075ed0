"""BANKING77 rows (from ../shared/data) for training tests and benchmarks, without pytest:
``banking_rows`` needs no Django; ``curated_banking`` builds a project whose curated dataset is
those queries with their gold labels as teacher answers."""
import csv
from pathlib import Path


def banking_rows(shared_data: Path, split: str, n_labels: int, per_label: int,
                 labels: list[str] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(labels, [(text, gold label)]): the first ``per_label`` rows of each of ``labels`` (default:
    the first ``n_labels`` intents, sorted by name) in BANKING77's ``split`` CSV."""
    rows = list(csv.DictReader(open(Path(shared_data) / "banking77" / f"{split}.csv", encoding="utf-8")))
    labels = labels or sorted({r["category"] for r in rows})[:n_labels]
    out, seen = [], {l: 0 for l in labels}
    for r in rows:
        c = r["category"]
        if c in seen and seen[c] < per_label:
            seen[c] += 1
            out.append((r["text"], c))
    return labels, out


def curated_banking(team, user, shared_data, *, n_labels=10, train_per_label=12, val_per_label=4):
    """A classification project whose curated dataset is BANKING77 queries answered with their
    gold labels, soft labels 0.7 on the gold label and the rest spread evenly."""
    from projects.models import GenerationRun, Query, Sample, Teacher
    from projects.services.projects import project_create

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
