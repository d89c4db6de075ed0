"""The layout rules of the house design (``../shared/DESIGN.md``, outside this repository) that
code can check."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pipeline_has_no_django_imports():
    files = list((REPO / "workers" / "pipeline").rglob("*.py"))
    assert files, "workers/pipeline is empty"
    offenders = {str(f.relative_to(REPO)): sorted(_imports(f) & {"django", "projects", "distillhub", "celery"})
                 for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_services_are_keyword_only():
    """Every public function in projects/services takes keyword-only arguments."""
    bad = []
    for f in (REPO / "projects" / "services").rglob("*.py"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                if node.args.args or node.args.posonlyargs:
                    # decorators/registration helpers that take one positional callback are allowed
                    if node.name in {"job_subject_sync"}:
                        continue
                    bad.append(f"{f.name}:{node.name}")
    assert bad == []


def test_no_utils_module():
    assert not [p for p in REPO.rglob("utils.py") if ".venv" not in p.parts]


def test_import_contracts():
    """The contracts in ``.importlinter``: projects.services queues tasks by name and never
    imports workers.tasks/runs/progress or the gateway (so no import cycle between the two
    floors), workers.runs never imports the tasks, views, CLI or gateway, and workers.pipeline
    imports no Django, Celery or project code."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache", "--config", str(REPO / ".importlinter")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_choices_have_one_source():
    """The methods, presets, providers and splits the forms and the CLI offer come from the
    models' choices and the pipeline's / services' constants; where the pipeline (no Django)
    keeps its own list, it matches the model's."""
    from projects.forms import TeacherForm, TrainForm
    from projects.models import Teacher, TrainingMethod
    from workers.pipeline.training import METHODS, PRESET_DESCRIPTIONS, PRESET_NAMES, PRESETS

    assert tuple(TrainingMethod.values) == METHODS == tuple(PRESETS)
    assert set(PRESET_DESCRIPTIONS) == set(PRESET_NAMES) == {p for m in PRESETS.values() for p in m}
    assert TrainForm.base_fields["method"].choices == [
        ("sft-lora", "SFT with LoRA (sft-lora)"), ("sft-full", "Full SFT (sft-full)"),
        ("classifier-kd", "Classifier with soft-label KD (classifier-kd)"), ("logit-kd", "Token-level logit KD (logit-kd)")]
    assert TrainForm.base_fields["preset"].choices == [("fast", "fast (minutes on a CPU)"), ("seed", "seed (the seed recipe)")]
    assert TeacherForm.base_fields["provider"].choices == list(Teacher.Provider.choices)
