"""What a team's settings may point at (workers/pipeline/security.py and
projects/services/security.py): model names never a free path or another project's artifact,
teacher keys only from variables the operator lists, teacher URLs never to internal addresses
unless the operator allows them. Each is checked when saved (service, form, CLI) and again on the
worker before anything is loaded, read or sent."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.urls import reverse

from tests.conftest import wait_job
from workers.pipeline.security import (NEVER_PASTE, Refused, SecurityPolicy, address_class, check_key_env,
                                       check_model_name, check_teacher_url, looks_like_secret)

STRICT = SecurityPolicy()  # the defaults: nothing local, OPENAI_API_KEY only, public URLs only


def _resolver(table: dict[str, list[str]]):
    """A getaddrinfo that answers from ``table`` (host -> addresses) and fails for the rest."""

    def getaddrinfo(host, port, type=0, **kw):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]

    return getaddrinfo


# --- model names (no Django) --------------------------------------------------------------------


def test_model_names_are_bundled_hub_ids_or_allowed_folders(tmp_path, monkeypatch):
    assert check_model_name("smollm2-135m-instruct", policy=STRICT) == "smollm2-135m-instruct"
    assert check_model_name("minilm-l6", policy=STRICT) == "minilm-l6"
    assert check_model_name("HuggingFaceTB/SmolLM2-360M-Instruct", policy=STRICT) == "HuggingFaceTB/SmolLM2-360M-Instruct"
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    for bad in (str(models / "tiny"), "/etc", "~/models/tiny", "./tiny", "../tiny", "org/../name", "org/./name",
                "org\\name", "gpt2", "a/b/c", "artifact:3", ".hidden/x", "org/name."):
        with pytest.raises(Refused, match="^student_model: .*(paths are refused|DISTILLHUB_MODEL_DIRS)"):
            check_model_name(bad, policy=STRICT, field="student_model")
    allowed = STRICT.with_model_dirs(str(models))
    assert check_model_name(str(models / "tiny"), policy=allowed) == str((models / "tiny").resolve())
    assert check_model_name(str(models), policy=allowed) == str(models.resolve())
    # .. segments, and a symlink that leads out of the allowed directory, stay refused.
    with pytest.raises(Refused, match="DISTILLHUB_MODEL_DIRS"):
        check_model_name(str(models / "tiny" / ".." / ".." / "elsewhere"), policy=allowed)
    (tmp_path / "secret").mkdir()
    (models / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(Refused, match="DISTILLHUB_MODEL_DIRS"):
        check_model_name(str(models / "link"), policy=allowed)
    # A name shaped like a hub id that exists on disk (relative to the process) would be read
    # from disk by from_pretrained: refused.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "weights").mkdir(parents=True)
    with pytest.raises(Refused, match="exists as a file or folder on this machine"):
        check_model_name("acme/weights", policy=allowed)


def test_the_pipeline_refuses_a_free_path_before_reading_it(tmp_path):
    from workers.pipeline.local_lm import _CACHE, load_cached, LocalCausalLM
    from workers.pipeline.registry import resolve_model
    from workers.pipeline.specs import TaskSpec
    from workers.pipeline.training import TrainingRefused, TrainRow, TrainSpec, resolve_hyperparams, train

    folder = tmp_path / "their-model"
    folder.mkdir()
    with pytest.raises(Refused, match="DISTILLHUB_MODEL_DIRS"):
        resolve_model(str(folder), policy=STRICT)
    for kind in ("merged", "adapter", "int8"):
        with pytest.raises(Refused, match="DISTILLHUB_MODEL_DIRS"):
            LocalCausalLM.load(str(folder), kind=kind, policy=STRICT)
    # A model another caller was allowed to load is not handed out from the cache.
    sentinel = object()
    _CACHE[(str(folder), "base", "cpu")] = sentinel
    try:
        with pytest.raises(Refused):
            load_cached(str(folder), kind="base", device="cpu", policy=STRICT)
        assert load_cached(str(folder), kind="base", device="cpu", policy=STRICT.with_model_dirs(str(folder))) is sentinel
    finally:
        _CACHE.pop((str(folder), "base", "cpu"), None)
    spec = TrainSpec(method="classifier-kd", student_model=str(folder), task=TaskSpec(task_type="classification",
                     labels=("a", "b")), train_rows=[TrainRow(query="x", label="a")], val_rows=[],
                     hyperparams=resolve_hyperparams("classifier-kd", "fast"), output_dir=str(tmp_path / "out"),
                     checkpoint_dir=str(tmp_path / "ckpt"), policy=STRICT)
    with pytest.raises(TrainingRefused, match="^student_model: .*DISTILLHUB_MODEL_DIRS"):
        train(spec)
    assert not (tmp_path / "out" / "classifier").exists()


# --- teacher keys (no Django) -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["sk-proj-abc123", "sk_live_x", "hf_AbCdEf123", "gsk_123abc",
                                   "Xy7pQ2mN9vL4kR8sT1wZ3bC6", "A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6E7"])
def test_a_pasted_key_is_refused_without_echoing_it(value):
    assert looks_like_secret(value)
    with pytest.raises(Refused) as exc:
        check_key_env(value, policy=STRICT)
    assert str(exc.value) == f"api_key_env: {NEVER_PASTE}" and value not in str(exc.value)
    assert "name the environment variable, never paste the key" in str(exc.value)


def test_only_listed_key_variables_are_allowed():
    assert check_key_env("OPENAI_API_KEY", policy=STRICT) == "OPENAI_API_KEY"
    assert check_key_env("", policy=STRICT) == ""
    for name in ("HOME", "DATABASE_URL", "SECRET_KEY", "AZURE_OPENAI_KEY_2"):
        assert not looks_like_secret(name)
        with pytest.raises(Refused, match=rf"^api_key_env: {name} is not one of the key variables the operator "
                                          r"allows \(OPENAI_API_KEY\).*DISTILLHUB_TEACHER_KEY_ENVS"):
            check_key_env(name, policy=STRICT)
    wider = SecurityPolicy.from_env({"DISTILLHUB_TEACHER_KEY_ENVS": "OPENAI_API_KEY, AZURE_OPENAI_KEY_2"})
    assert wider.teacher_key_envs == ("OPENAI_API_KEY", "AZURE_OPENAI_KEY_2")
    assert check_key_env("AZURE_OPENAI_KEY_2", policy=wider) == "AZURE_OPENAI_KEY_2"


# --- teacher URLs (no Django) -------------------------------------------------------------------


@pytest.mark.parametrize("address,kind", [
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.5", "private"), ("192.168.1.10", "private"), ("fd12::1", "private"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "unspecified"), ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("100.64.0.1", "non-public"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("8.8.8.8", "public"), ("2606:4700:4700::1111", "public"),
])
def test_address_classes(address, kind):
    import ipaddress

    assert address_class(ipaddress.ip_address(address)) == kind


def test_teacher_urls_reach_only_public_addresses_unless_allowed():
    dns = _resolver({"api.example.com": ["93.184.216.34"], "metadata.example.com": ["169.254.169.254"],
                     "mixed.example.com": ["93.184.216.34", "10.0.0.7"], "vllm.internal": ["10.0.5.20"],
                     "localhost": ["127.0.0.1", "::1"]})

    def check(url, policy=STRICT, **kw):
        return check_teacher_url(url, policy=policy, getaddrinfo=dns, **kw)

    assert check("") == ""
    assert check("https://api.example.com/v1") == "https://api.example.com/v1"
    for url, needle in [
        ("ftp://api.example.com/v1", "must start with http:// or https://"),
        ("file:///etc/passwd", "must start with http:// or https://"),
        ("http://user:pw@api.example.com/v1", "no user name or password"),
        ("http://api.example.com:99999/v1", "not a valid URL"),
        ("http:///v1", "has no host"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://metadata.example.com/", "metadata.example.com resolves to 169.254.169.254, a link-local address"),
        ("http://127.0.0.1:8080/v1", "127.0.0.1 is a loopback address"),
        ("http://localhost:11434/v1", "localhost resolves to 127.0.0.1, a loopback address"),
        ("http://[::1]:8000/v1", "::1 is a loopback address"),
        ("http://[fe80::1%25eth0]/v1", "fe80::1 is a link-local address"),
        ("http://0.0.0.0:8000/v1", "0.0.0.0 is an unspecified address"),
        ("http://10.1.2.3/v1", "private"), ("http://172.16.0.5/v1", "private"), ("http://192.168.1.10/v1", "private"),
        ("http://[fd12::1]/v1", "private"),
        ("http://mixed.example.com/v1", "resolves to 10.0.0.7, a private address"),  # every address counts
    ]:
        with pytest.raises(Refused, match="^base_url: ") as exc:
            check(url)
        assert needle in str(exc.value), (url, str(exc.value))
    # A host that does not resolve passes when saved, and is refused on the worker.
    assert check("https://nowhere.example/v1") == "https://nowhere.example/v1"
    with pytest.raises(Refused, match="the host nowhere.example does not resolve"):
        check("https://nowhere.example/v1", require_resolution=True)
    # The operator's choices: private addresses (never link-local / unspecified), or named hosts and CIDRs.
    private = SecurityPolicy(allow_private_teacher_urls=True)
    for url in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://vllm.internal:8000/v1",
                "http://[fd12::1]/v1"):
        assert check(url, private) == url
    for url in ("http://169.254.169.254/", "http://metadata.example.com/", "http://0.0.0.0/v1"):
        with pytest.raises(Refused, match="listing the host or its CIDR in DISTILLHUB_TEACHER_URL_ALLOW"):
            check(url, private)
    listed = SecurityPolicy.from_env({"DISTILLHUB_TEACHER_URL_ALLOW": "vllm.internal, 127.0.0.1, 192.168.7.0/24"})
    assert listed.teacher_url_allow == ("vllm.internal", "127.0.0.1/32", "192.168.7.0/24")
    for url in ("http://vllm.internal:8000/v1", "http://127.0.0.1:8080/v1", "http://192.168.7.9/v1"):
        assert check(url, listed) == url
    for url in ("http://localhost:8080/v1", "http://192.168.8.9/v1", "http://10.0.5.20/v1"):
        with pytest.raises(Refused):
            check(url, listed)


def test_policy_from_env_rejects_malformed_values(tmp_path):
    assert SecurityPolicy.from_env({}) == SecurityPolicy()
    p = SecurityPolicy.from_env({"DISTILLHUB_MODEL_DIRS": f"{tmp_path}, /srv/models",
                                 "DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS": "yes"})
    assert p.model_dirs == (str(tmp_path.resolve()), "/srv/models") and p.allow_private_teacher_urls
    for env, needle in [({"DISTILLHUB_MODEL_DIRS": "models"}, "DISTILLHUB_MODEL_DIRS: 'models' is not an absolute"),
                        ({"DISTILLHUB_TEACHER_KEY_ENVS": "sk-abc123"}, "DISTILLHUB_TEACHER_KEY_ENVS: list variable NAMES"),
                        ({"DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS": "maybe"}, "is not a boolean"),
                        ({"DISTILLHUB_TEACHER_URL_ALLOW": "http://x/"}, "neither a host name nor a CIDR")]:
        with pytest.raises(ValueError, match=needle):
            SecurityPolicy.from_env(env)


def test_the_openai_client_checks_key_and_url_before_any_request(monkeypatch):
    from tests.openai_stub import StubServer
    from workers.pipeline.teachers import RunStopped, TeacherConfig, make_client

    stub = StubServer().start()
    try:
        monkeypatch.setenv("HOME", "/root")
        cfg = TeacherConfig(id=1, name="api", provider="openai", model="m", base_url=stub.base_url,
                            api_key_env="HOME", policy=SecurityPolicy(allow_private_teacher_urls=True))
        with pytest.raises(RunStopped, match="api_key_env: HOME is not one of the key variables") as exc:
            make_client(cfg, labels=(), task_type="generation")
        assert exc.value.reason == "refused"
        cfg = TeacherConfig(id=1, name="api", provider="openai", model="m", base_url=stub.base_url, policy=STRICT)
        with pytest.raises(RunStopped, match="base_url: 127.0.0.1 is a loopback address") as exc:
            make_client(cfg, labels=(), task_type="generation")
        cfg = TeacherConfig(id=1, name="local", provider="transformers", model="/etc", policy=STRICT)
        with pytest.raises(RunStopped, match="teacher local: model: '/etc' is not a bundled model") as exc:
            make_client(cfg, labels=(), task_type="generation")
        assert sum(stub.attempts.values()) == 0  # nothing was sent
    finally:
        stub.stop()


# --- saved settings: services, forms, CLI ---------------------------------------------------------


def _minilm_source() -> Path:
    """A private copy (not links) of the bundled MiniLM encoder under MEDIA_ROOT, made once:
    the test artifacts below hard-link to it, never to the installed package, whose files a
    writer into a linked folder would change."""
    from workers.pipeline.registry import MINILM, resolve_model

    src = Path(django_settings.MEDIA_ROOT) / "test-security" / "minilm-source"
    if not (src / "model.safetensors").exists():
        tmp = src.with_name(src.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(resolve_model(MINILM), tmp, ignore=shutil.ignore_patterns("1_Pooling", "README.md"))
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp, src)
    return src


def _minilm_folder(dst: Path) -> Path:
    """A real model folder (the MiniLM encoder, hard-linked from the private copy): what a
    classifier-kd student starts from. Nothing writes into it."""
    if not (dst / "config.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)

        def link(s, d):
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

        shutil.copytree(_minilm_source(), dst, copy_function=link)
    return dst


def _artifact(project, kind="classifier"):
    """A finished training run of ``project`` with a ``kind`` artifact folder under MEDIA_ROOT
    (apart from the folders real runs write to)."""
    from projects.models import ModelArtifact, TrainingRun

    run = TrainingRun.objects.create(project=project, method="classifier-kd", student_model="minilm-l6",
                                     status="succeeded")
    rel = f"test-security/{project.slug}/run-{run.pk}-{kind}"
    _minilm_folder(Path(django_settings.MEDIA_ROOT) / rel)
    return ModelArtifact.objects.create(project=project, training_run=run, kind=kind, path=rel, size_bytes=1)


@pytest.fixture
def two_teams(team, owner, other_team, outsider, shared_data):
    """Team A (``team``) with a trained classifier artifact; team B (``other_team``) with a
    curated dataset of its own, ready to train."""
    from tests.test_training import curated_banking

    a = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    b = curated_banking(other_team, outsider, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    return a, _artifact(a), b


def test_a_team_cannot_train_on_another_teams_artifact(two_teams, outsider):
    from projects.models import TrainingRun
    from projects.services import InvalidInput
    from projects.services.training import training_start

    a, art, b = two_teams
    folder = str(Path(django_settings.MEDIA_ROOT) / art.path)
    with pytest.raises(InvalidInput, match=r"^student_model: .* a local folder is allowed only under a directory "
                                           r"the operator lists in DISTILLHUB_MODEL_DIRS"):
        training_start(project=b, method="classifier-kd", student_model=folder, user=outsider)
    with pytest.raises(InvalidInput, match=rf"^student_model: artifact {art.pk} is not an artifact of project {b.slug}"):
        training_start(project=b, method="classifier-kd", student_model=f"artifact:{art.pk}", user=outsider)
    with pytest.raises(InvalidInput, match="^student_model: artifact 999999 is not an artifact of project"):
        training_start(project=b, method="classifier-kd", student_model="artifact:999999", user=outsider)
    for free in ("~/x", "../" + art.path, "/tmp"):
        with pytest.raises(InvalidInput, match="^student_model: "):
            training_start(project=b, method="sft-lora", student_model=free, user=outsider)
    assert not TrainingRun.objects.filter(project=b).exists()


def test_own_artifacts_hub_ids_and_operator_folders_are_accepted(two_teams, owner, tmp_path, settings):
    from projects.services import InvalidInput
    from projects.services.training import training_start

    a, art, b = two_teams
    run = training_start(project=a, method="classifier-kd", student_model=f"Artifact: {art.pk}", user=owner)
    assert run.student_model == f"artifact:{art.pk}"
    run = training_start(project=a, method="sft-lora", student_model="HuggingFaceTB/SmolLM2-360M-Instruct", user=owner)
    assert run.student_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(InvalidInput, match=f"student_model: artifact {art.pk} is a classifier artifact; use a merged"):
        training_start(project=a, method="sft-lora", student_model=f"artifact:{art.pk}", user=owner)
    folder = _minilm_folder(tmp_path / "operator-models" / "minilm")
    with pytest.raises(InvalidInput, match="DISTILLHUB_MODEL_DIRS"):
        training_start(project=a, method="classifier-kd", student_model=str(folder), user=owner)
    settings.MODEL_DIRS = [str(tmp_path / "operator-models")]
    run = training_start(project=a, method="classifier-kd", student_model=str(folder), user=owner)
    assert run.student_model == str(folder.resolve())


def test_teacher_settings_are_checked_when_saved(project, owner, other_team, outsider, settings):
    from projects.models import Teacher
    from projects.services import InvalidInput
    from projects.services.generation import teacher_create, teacher_update
    from projects.services.projects import project_create

    theirs = project_create(team=other_team, user=outsider, name="Theirs", task_type="generation")
    their_art = _artifact(theirs, kind="merged")
    cases = [
        (dict(provider="openai", model="m", api_key_env="HOME"), "api_key_env: HOME is not one of the key variables"),
        (dict(provider="openai", model="m", api_key_env="sk-proj-123abc"), "never paste the key"),
        (dict(provider="openai", model="m", api_key_env="hf_abcdef"), "never paste the key"),
        (dict(provider="openai", model="m", base_url="http://169.254.169.254/v1"), "base_url: 169.254.169.254 is a link-local"),
        (dict(provider="openai", model="m", base_url="gopher://x/"), "base_url: 'gopher://x/' must start with http"),
        (dict(provider="transformers", model="/etc"), "model: '/etc' is not a bundled model"),
        (dict(provider="transformers", model=f"artifact:{their_art.pk}"),
         f"model: artifact {their_art.pk} is not an artifact of project {project.slug}"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(InvalidInput) as exc:
            teacher_create(project=project, name="t", user=owner, **kwargs)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (kwargs, str(exc.value))
    settings.ALLOW_PRIVATE_TEACHER_URLS = False
    with pytest.raises(InvalidInput, match="base_url: 127.0.0.1 is a loopback address"):
        teacher_create(project=project, name="t", provider="openai", model="m", base_url="http://127.0.0.1:8080/v1",
                       user=owner)
    settings.ALLOW_PRIVATE_TEACHER_URLS = True
    assert not Teacher.objects.filter(project=project).exists()
    settings.TEACHER_KEY_ENVS = ["OPENAI_API_KEY", "GROQ_API_KEY"]  # as DISTILLHUB_TEACHER_KEY_ENVS would
    t = teacher_create(project=project, name="groq", provider="openai", model="llama", api_key_env="GROQ_API_KEY",
                       base_url="http://127.0.0.1:8080/v1", user=owner)
    assert t.api_key_env == "GROQ_API_KEY"
    settings.TEACHER_KEY_ENVS = ["OPENAI_API_KEY"]
    with pytest.raises(InvalidInput, match="api_key_env: GROQ_API_KEY is not one of"):
        teacher_update(teacher=t, user=owner, temperature=0.5)
    clf = _artifact(project, kind="classifier")
    with pytest.raises(InvalidInput, match=f"^model: artifact {clf.pk} is a classifier artifact; use a merged artifact"):
        teacher_create(project=project, name="clf", provider="transformers", model=f"artifact:{clf.pk}", user=owner)
    mine = _artifact(project, kind="merged")
    local = teacher_create(project=project, name="mine", provider="transformers", model=f"artifact:{mine.pk}", user=owner)
    assert local.model == f"artifact:{mine.pk}"


def test_forms_show_the_refusal_on_the_field(two_teams, owner, client):
    from projects.models import ModelArtifact, Teacher, TrainingRun

    a, art, b = two_teams
    client.force_login(owner)
    url = reverse("training_start", kwargs={"slug": a.slug})
    page = client.get(reverse("training_page", kwargs={"slug": a.slug})).content.decode()
    assert f'<option value="{art.pk}">artifact:{art.pk} (classifier of training run {art.training_run_id})</option>' in page
    r = client.post(url, {"method": "classifier-kd", "preset": "fast", "student_model": str(Path(django_settings.MEDIA_ROOT) / art.path)})
    assert r.status_code == 400 and "DISTILLHUB_MODEL_DIRS" in r.content.decode()
    b_art = _artifact(b)
    r = client.post(url, {"method": "classifier-kd", "preset": "fast", "student_artifact": str(b_art.pk)})
    assert r.status_code == 400 and "That is not a model artifact of this project." in r.content.decode()
    r = client.post(url, {"method": "classifier-kd", "preset": "fast", "student_model": f"artifact:{b_art.pk}"})
    assert r.status_code == 400 and f"artifact {b_art.pk} is not an artifact of project {a.slug}" in r.content.decode()
    assert not TrainingRun.objects.filter(project=a, job__isnull=False).exists()
    r = client.post(url, {"method": "classifier-kd", "preset": "fast", "student_artifact": str(art.pk)})
    assert r.status_code == 302
    assert TrainingRun.objects.get(project=a, job__isnull=False).student_model == f"artifact:{art.pk}"

    new = reverse("teacher_new", kwargs={"slug": a.slug})
    base = {"name": "t", "provider": "openai", "model": "m", "temperature": "0.3", "max_tokens": "16", "timeout_s": "30",
            "price_in_per_1m": "0", "price_out_per_1m": "0"}
    for extra, needle in [({"api_key_env": "HOME"}, "api_key_env: HOME is not one of the key variables"),
                          ({"api_key_env": "gsk_abc123"}, "name the environment variable, never paste the key"),
                          ({"base_url": "http://169.254.169.254/latest"}, "169.254.169.254 is a link-local address"),
                          ({"provider": "transformers", "model": "/etc/passwd"}, "DISTILLHUB_MODEL_DIRS"),
                          ({"provider": "transformers", "model": "", "model_artifact": str(art.pk)},
                           "That is not a model artifact of this project.")]:
        r = client.post(new, {**base, **extra})
        assert r.status_code == 200 and needle in r.content.decode(), extra
    assert not Teacher.objects.filter(project=a, name="t").exists()
    merged = _artifact(a, kind="merged")
    r = client.post(new, {**base, "provider": "transformers", "model": "", "model_artifact": str(merged.pk)})
    assert r.status_code == 302 and Teacher.objects.get(project=a, name="t").model == f"artifact:{merged.pk}"
    assert ModelArtifact.objects.filter(project=a).count() == 2


@pytest.mark.django_db(transaction=True)
def test_cli_refuses_free_paths_foreign_artifacts_keys_and_internal_urls(team, owner, other_team, outsider, shared_data):
    from tests.test_cli import distill
    from tests.test_training import curated_banking

    a = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    art = _artifact(a)
    b = curated_banking(other_team, outsider, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    folder = str(Path(django_settings.MEDIA_ROOT) / art.path)
    for student, needle in [(folder, "DISTILLHUB_MODEL_DIRS"),
                            (f"artifact:{art.pk}", f"artifact {art.pk} is not an artifact of project {b.slug}")]:
        r = distill("train", "--project", b.slug, "--method", "classifier-kd", "--student", student, "--json")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("error: student_model: ") and needle in r.stderr
    for args, needle in [(["--api-key-env", "HOME"], "error: api_key_env: HOME is not one of the key variables"),
                         (["--api-key-env", "sk-proj-abc123"], "name the environment variable, never paste the key"),
                         (["--base-url", "http://169.254.169.254/v1"], "error: base_url: 169.254.169.254 is a link-local")]:
        r = distill("teacher", "add", "--project", b.slug, "--name", "x", "--provider", "openai", "--model", "m", *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert "sk-proj-abc123" not in r.stderr
    # Loopback only where the operator allows it (the tests allow it; here it is off).
    r = distill("teacher", "add", "--project", b.slug, "--name", "x", "--provider", "openai", "--model", "m",
                "--base-url", "http://127.0.0.1:8080/v1", env={"DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS": "0"})
    assert r.returncode == 1 and "base_url: 127.0.0.1 is a loopback address" in r.stderr
    r = distill("teacher", "add", "--project", b.slug, "--name", "x", "--provider", "transformers", "--model", folder)
    assert r.returncode == 1 and r.stderr.startswith("error: model: ") and "DISTILLHUB_MODEL_DIRS" in r.stderr


# --- the worker checks again ----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_worker_refuses_a_free_path_a_row_holds_and_trains_from_an_own_artifact(celery_worker, team, owner,
                                                                                       other_team, outsider, shared_data):
    from django.db import transaction

    from projects.models import JobStatus, TrainingRun
    from projects.services.training import training_start
    from tests.test_training import curated_banking

    a = curated_banking(team, owner, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    art = _artifact(a)
    b = curated_banking(other_team, outsider, shared_data, n_labels=3, train_per_label=3, val_per_label=1)
    folder = str(Path(django_settings.MEDIA_ROOT) / art.path)
    # A row that somehow holds a free path (another team's artifact folder) or another project's
    # artifact id: the worker refuses before loading anything.
    for bad in (folder, f"artifact:{art.pk}"):
        with transaction.atomic():
            run = training_start(project=b, method="classifier-kd", student_model="minilm-l6", user=outsider)
            TrainingRun.objects.filter(pk=run.pk).update(student_model=bad)
        job = wait_job(run.job_id, timeout=120)
        run.refresh_from_db()
        assert job.status == JobStatus.FAILED and run.status == "failed", job.message
        assert run.stop_reason.startswith("student_model: ") and not run.artifacts.exists(), run.stop_reason
    # The project's own artifact, chosen by id, is resolved to its folder on the worker.
    run = training_start(project=a, method="classifier-kd", student_model=f"artifact:{art.pk}", user=owner,
                         overrides={"num_train_epochs": 1, "per_device_train_batch_size": 8})
    job = wait_job(run.job_id, timeout=240)
    assert job.status == JobStatus.SUCCEEDED, job.error
    run.refresh_from_db()
    assert run.student_model == f"artifact:{art.pk}" and run.artifacts.filter(kind="classifier").exists()


@pytest.mark.timeout(180)
def test_the_worker_refuses_a_key_variable_or_model_a_row_holds(celery_worker, team, owner):
    from projects.models import GenerationRun, Sample, Teacher
    from projects.services.generation import generation_start
    from tests.generation_fixtures import add_queries, banking_project
    from tests.openai_stub import StubServer

    stub = StubServer(answer=lambda text: "card_arrival").start()
    try:
        for kwargs, needle in [
            (dict(provider="openai", model="m", base_url=stub.base_url, api_key_env="HOME"),
             "refused: teacher bad: api_key_env: HOME is not one of the key variables"),
            (dict(provider="transformers", model="/etc"), "refused: teacher bad: model: '/etc' is not a bundled model"),
        ]:
            project = banking_project(team, owner, name=f"Banking {kwargs['provider']}")
            add_queries(project, [("where is my card", "card_arrival"), ("I lost my card", "lost_or_stolen_card")])
            Teacher.objects.create(project=project, name="bad", **kwargs)  # bypassing the checks on save
            run = generation_start(project=project, user=owner)
            job = wait_job(run.job.pk, timeout=120)
            run = GenerationRun.objects.get(pk=run.pk)
            assert job.status == "failed" and run.stop_reason.startswith(needle), run.stop_reason
            assert Sample.objects.filter(run=run).count() == 0
        assert sum(stub.attempts.values()) == 0
    finally:
        stub.stop()


def test_the_judge_is_checked_before_it_is_called(project, owner):
    from projects.models import Evaluation, Teacher
    from projects.selectors import project_task_spec
    from projects.services import InvalidInput
    from workers.runs.evaluation import _judge

    Teacher.objects.create(project=project, name="judge", provider="openai", model="m", api_key_env="HOME")
    ev = Evaluation.objects.create(project=project, split="test", options={"judge_teacher": "judge"})
    with pytest.raises(InvalidInput, match="judge_teacher 'judge': api_key_env: HOME is not one of"):
        _judge(ev, project_task_spec(project))
    Teacher.objects.filter(name="judge").update(api_key_env="", base_url="http://169.254.169.254/v1")
    with pytest.raises(InvalidInput, match="judge_teacher 'judge': base_url: 169.254.169.254 is a link-local"):
        _judge(ev, project_task_spec(project))
    Teacher.objects.filter(name="judge").update(provider="transformers", model="/root/.cache/x", base_url="")
    with pytest.raises(InvalidInput, match="judge_teacher 'judge': model: .*DISTILLHUB_MODEL_DIRS"):
        _judge(ev, project_task_spec(project))
