"""projects.services.artifacts and ``distill export-gguf``: a merged student (the bundled SmolLM2
saved as an sft-lora run's ``merged`` artifact, no training needed) exported to GGUF, served by
llama.cpp's OpenAI-compatible server with the same greedy tokens as transformers, and deployed
behind the real gateway as an external-endpoint student."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from gateway.readiness import wait_served
from tests.llama_server import llama_server
from tests.openai_stub import StubServer
from tests.test_cli import distill, last_json

PROMPT = "The capital of France is"
N_TOKENS = 8


@pytest.fixture
def merged_student(project, owner):
    """A succeeded sft-lora run of ``project`` whose ``merged`` artifact holds the bundled SmolLM2
    as a run saves its student (config, tokenizer, safetensors weights; the weights linked, not
    copied, to spare the disk): ``(run, artifact, folder)``. The run's folder is removed after."""
    from django.conf import settings

    from projects.models import JobStatus, ModelArtifact, TrainingRun
    from projects.services.training import run_output_dir
    from workers.pipeline.registry import SMOLLM2, resolve_model

    run = TrainingRun.objects.create(project=project, method="sft-lora", student_model=SMOLLM2, preset="fast",
                                     status=JobStatus.SUCCEEDED, created_by=owner)
    folder = run_output_dir(run=run) / "merged"
    folder.mkdir(parents=True)
    for f in Path(resolve_model(SMOLLM2)).iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    art = ModelArtifact.objects.create(project=project, training_run=run, kind="merged",
                                       path=str(folder.relative_to(settings.MEDIA_ROOT)))
    yield run, art, folder
    shutil.rmtree(folder.parent, ignore_errors=True)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def hf_greedy():
    """transformers' greedy continuation (fp32) of PROMPT, and of a chat turn, by the bundled
    SmolLM2: ``{"completion": (text, ids), "chat": (text, ids), "chat_messages": [...]}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.pipeline.registry import SMOLLM2, resolve_model

    folder = resolve_model(SMOLLM2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for key, text in (("completion", PROMPT), ("chat", chat_prompt)):
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        out[key] = (tok.decode(new, skip_special_tokens=True), new)
    out["chat_messages"] = messages
    out["tokenizer"] = tok
    return out


@pytest.mark.timeout(900)
def test_export_gguf_serves_with_llama_cpp_and_behind_the_gateway(gateway, project, owner, merged_student, tmp_path,
                                                                  hf_greedy):
    from projects.models import ModelArtifact, RequestLog
    from projects.services.deployments import deployment_create, gateway_key_create
    from projects.services.generation import teacher_create
    from workers.pipeline.gguf_export import file_sha256

    run, merged, _ = merged_student
    copy = tmp_path / "out" / "student.gguf"
    r = distill("export-gguf", "--artifact", f"artifact:{merged.pk}", "--outtype", "f32", "--out", str(copy), "--json",
                timeout=300)
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    art = ModelArtifact.objects.get(pk=out["artifact"])
    assert (art.kind, art.training_run_id, art.project_id, out["source_artifact"], out["outtype"]) == (
        "gguf", run.pk, project.pk, merged.pk, "f32")
    assert art.path == f"artifacts/{project.slug}/run-{run.pk}/student-f32.gguf" == out["path"]
    file = Path(out["file"])
    assert art.size_bytes == file.stat().st_size == copy.stat().st_size > 500_000_000  # 135M weights x 4 bytes
    assert art.sha256 == out["sha256"] == file_sha256(file) == file_sha256(copy)
    assert out["serve"] == f"python -m llama_cpp.server --model {copy.resolve()} --model_alias artifact-{art.pk}"

    alias = f"artifact-{art.pk}"
    with llama_server(file, alias=alias) as base:
        # Greedy decoding of the exported GGUF under llama.cpp gives transformers' greedy tokens,
        # on a plain prompt and on a chat turn (the chat template travels in the GGUF).
        # repeat_penalty 1.0: llama-cpp-python's server penalizes repeats (1.1) unless told not to.
        greedy = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": N_TOKENS, "model": alias}
        got = _post(base + "/completions", {**greedy, "prompt": PROMPT})["choices"][0]["text"]
        want_text, want_ids = hf_greedy["completion"]
        assert got == want_text and len(want_ids) == N_TOKENS
        assert hf_greedy["tokenizer"](got, add_special_tokens=False).input_ids == want_ids
        got = _post(base + "/chat/completions", {**greedy, "messages": hf_greedy["chat_messages"]})
        assert got["choices"][0]["message"]["content"] == hf_greedy["chat"][0]

        # The deployment points at the llama.cpp server as its external student endpoint; its
        # student_model left blank, the gateway asks for "artifact-<id>", the server's alias.
        teacher_stub = StubServer(answer=lambda text: "Paris.").start()
        try:
            teacher = teacher_create(project=project, name="gpt", provider="openai", model="stub-teacher",
                                     base_url=teacher_stub.base_url, api_key_env="OPENAI_API_KEY", user=owner)
            dep = deployment_create(project=project, name="capitals", teacher=teacher, user=owner,
                                    student_artifact=art.pk, student_url=base, student_share=1.0)
            _, key = gateway_key_create(team=project.team, name="tests", user=owner)
            # The gateway reloads keys and deployments every 0.3 s here: wait until it serves them.
            wait_served(gateway.base_url, key, slug=dep.slug, version=dep.version, timeout_s=120)
            client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=300)
            raw = client.chat.completions.with_raw_response.create(
                model="capitals", messages=hf_greedy["chat_messages"], max_tokens=N_TOKENS, temperature=0.0)
            resp = raw.parse()
        finally:
            teacher_stub.stop()
        assert raw.headers["x-distillhub-route"] == "student"
        assert sum(teacher_stub.attempts.values()) == 0
        # The gateway's answer is the exported student's: the same request sent to llama.cpp
        # directly (what the gateway sends: model, messages, max_tokens, temperature) gets it too.
        direct = _post(base + "/chat/completions", {"model": alias, "messages": hf_greedy["chat_messages"],
                                                    "max_tokens": N_TOKENS, "temperature": 0.0})
        assert resp.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert resp.choices[0].message.content.startswith(hf_greedy["chat"][0].split()[0])
    deadline = time.time() + 120  # the gateway flushes logs every 0.2 s; generous for a loaded machine
    while not (logs := list(RequestLog.objects.filter(deployment=dep))) and time.time() < deadline:
        time.sleep(0.1)
    assert [(x.route, x.status) for x in logs] == [("student", 200)]
    copy.unlink()  # 540 MB; pytest keeps recent tmp folders


@pytest.mark.django_db
def test_export_refuses_other_kinds_and_unsupported_architectures(project, merged_student, viewer):
    from projects.models import ModelArtifact
    from projects.services import InvalidInput, NotAllowed
    from projects.services.artifacts import artifact_export_gguf

    run, merged, folder = merged_student
    clf = ModelArtifact.objects.create(project=project, training_run=run, kind="classifier", path="x")
    with pytest.raises(InvalidInput, match=rf"^artifact {clf.pk} is a 'classifier' artifact; GGUF export takes a merged"):
        artifact_export_gguf(artifact=clf)
    with pytest.raises(InvalidInput, match=r"^outtype: 'q4' is not one of f32, f16, q8_0"):
        artifact_export_gguf(artifact=merged, outtype="q4")
    with pytest.raises(NotAllowed):
        artifact_export_gguf(artifact=merged, user=viewer)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match=rf"^artifact {merged.pk}: architecture Qwen2ForCausalLM is not supported"):
        artifact_export_gguf(artifact=merged)
    assert not ModelArtifact.objects.filter(training_run=run, kind="gguf").exists()
    assert not list(folder.parent.glob("*.gguf*"))


@pytest.mark.django_db
def test_a_gguf_student_needs_its_endpoint_url(project, owner):
    from projects.models import ModelArtifact
    from projects.services import InvalidInput
    from projects.services.deployments import deployment_create
    from projects.services.generation import teacher_create

    teacher = teacher_create(project=project, name="gpt", provider="openai", model="gpt-4o-mini",
                             api_key_env="OPENAI_API_KEY", user=owner)
    art = ModelArtifact.objects.create(project=project, kind="gguf", path="x/student-f16.gguf")
    with pytest.raises(InvalidInput, match=rf"^student_url: a gguf student is served by llama.cpp .*--model_alias "
                                           rf"artifact-{art.pk}`\); give its URL"):
        deployment_create(project=project, name="s", teacher=teacher, user=owner, student_artifact=art.pk)
    dep = deployment_create(project=project, name="s", teacher=teacher, user=owner, student_artifact=art.pk,
                            student_url="https://llama.example.com/v1")
    assert (dep.student_artifact_id, dep.student_url, dep.student_model) == (art.pk, "https://llama.example.com/v1", "")


@pytest.mark.django_db(transaction=True)
def test_cli_export_q8_0_shows_on_the_run_page_and_replaces_an_earlier_export(project, owner, merged_student, client):
    from projects.models import ModelArtifact

    run, merged, _ = merged_student
    r = distill("export-gguf", "--artifact", "nope", "--json")
    assert r.returncode == 1 and "--artifact: 'nope' is not an artifact id" in r.stderr
    r = distill("export-gguf", "--artifact", "999999", "--json")
    assert r.returncode == 1 and "--artifact: no artifact with id 999999" in r.stderr
    r = distill("export-gguf", "--artifact", str(merged.pk), "--outtype", "f16", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    f16 = Path(last_json(r)["file"])
    r = distill("export-gguf", "--artifact", str(merged.pk), "--outtype", "q8_0", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    art = ModelArtifact.objects.get(training_run=run, kind="gguf")  # one per run: the q8_0 replaced the f16
    assert (art.pk, art.path) == (out["artifact"], f"artifacts/{project.slug}/run-{run.pk}/student-q8_0.gguf")
    assert not f16.exists() and 130_000_000 < art.size_bytes < 160_000_000  # about 8.5 bits a weight

    client.force_login(owner)
    page = client.get(f"/p/{project.slug}/training/runs/{run.pk}/").content.decode()
    assert f"<code>artifact:{art.pk}</code>" in page and f"student-q8_0.gguf" in page and art.sha256 in page


@pytest.mark.django_db
def test_export_refuses_an_out_path_it_cannot_write_before_converting(project, merged_student, tmp_path):
    """``--out`` a folder, or under a file: a clear error naming ``out``, raised before the
    conversion, with no gguf artifact recorded and no file left (was an OSError traceback after
    the artifact had been recorded)."""
    from projects.models import ModelArtifact
    from projects.services import InvalidInput
    from projects.services.artifacts import artifact_export_gguf

    run, merged, folder = merged_student
    (tmp_path / "a-file").write_text("x")
    for dest, why in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "student.gguf", "cannot write")):
        with pytest.raises(InvalidInput, match=rf"^out: {str(dest)!r} {why}"):
            artifact_export_gguf(artifact=merged, copy_to=str(dest))
    assert not ModelArtifact.objects.filter(training_run=run, kind="gguf").exists()
    assert not list(folder.parent.glob("*.gguf*")) and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
