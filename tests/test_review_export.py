"""The curated dataset export: exact bytes (real UTF-8, non-Latin text), the streaming download,
`distill export`, and that Hugging Face `datasets` loads the hf-jsonl file."""
import hashlib
import json

import pytest
from django.urls import reverse

from projects.services.review import curated_dataset_export, review_decide
from tests.review_data import make_samples

JA = "カードがまだ届きません 🙁"
RU = "Где мой возврат?"


@pytest.fixture
def curated(project, owner):
    s = make_samples(project, [
        {"query": JA, "response": "card_arrival", "parsed": "card_arrival",
         "label_probs": {"card_arrival": 0.9, "lost_or_stolen_card": 0.1}},
        {"query": RU, "response": "возврат", "failed": [("label_in_set", "not a label")]},
        {"query": "held out", "response": "card_arrival", "parsed": "card_arrival", "split": "test"},
        {"query": "rejected, left alone", "response": "??", "failed": [("label_in_set", "not a label")]},
    ])
    review_decide(sample=s[1], user=owner, decision="edit", edited_response="refund_not_showing_up", expected_version=0)
    return s


def expected_openai_bytes() -> bytes:
    return (
        '{"messages":[{"role":"user","content":"Label: カードがまだ届きません 🙁"},{"role":"assistant","content":"card_arrival"}]}\n'
        '{"messages":[{"role":"user","content":"Label: Где мой возврат?"},{"role":"assistant","content":"refund_not_showing_up"}]}\n'
    ).encode("utf-8")


def test_openai_chat_export_exact_bytes(project, curated, tmp_path):
    out = tmp_path / "train.jsonl"
    res = curated_dataset_export(project=project, fmt="openai-chat", path=out)
    data = out.read_bytes()
    assert data == expected_openai_bytes()
    assert b"\\u" not in data  # real characters, not escapes
    assert res == {"rows": 2, "sha256": hashlib.sha256(data).hexdigest(), "path": str(out), "format": "openai-chat"}


def test_hf_jsonl_exact_bytes_and_datasets_loads_it(project, curated, tmp_path):
    out = tmp_path / "hf.jsonl"
    curated_dataset_export(project=project, fmt="hf-jsonl", path=out)
    s0, s1 = curated[0].pk, curated[1].pk
    t = curated[0].teacher.name
    assert out.read_bytes() == (
        f'{{"sample_id":{s0},"query":"{JA}","answer":"card_arrival","label":"card_arrival",'
        '"label_probs":[{"label":"card_arrival","prob":0.9},{"label":"lost_or_stolen_card","prob":0.1}],'
        f'"teacher":"{t}","prompt":[{{"role":"user","content":"Label: {JA}"}}],'
        '"completion":[{"role":"assistant","content":"card_arrival"}]}\n'
        f'{{"sample_id":{s1},"query":"{RU}","answer":"refund_not_showing_up","label":"refund_not_showing_up",'
        f'"label_probs":[],"teacher":"{t}","prompt":[{{"role":"user","content":"Label: {RU}"}}],'
        '"completion":[{"role":"assistant","content":"refund_not_showing_up"}]}\n'
    ).encode("utf-8")

    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 2
    assert ds["query"] == [JA, RU]
    assert ds["label"] == ["card_arrival", "refund_not_showing_up"]
    assert ds[0]["label_probs"] == [{"label": "card_arrival", "prob": 0.9}, {"label": "lost_or_stolen_card", "prob": 0.1}]
    assert ds[1]["completion"] == [{"role": "assistant", "content": "refund_not_showing_up"}]


def test_download_streams_same_bytes(owner_client, project, curated):
    r = owner_client.get(reverse("review_export", kwargs={"slug": project.slug}), {"format": "openai-chat"})
    assert r.status_code == 200 and r.streaming
    assert r["Content-Type"] == "application/jsonl; charset=utf-8"
    assert f'filename="{project.slug}-openai-chat.jsonl"' in r["Content-Disposition"]
    assert b"".join(r.streaming_content) == expected_openai_bytes()


def test_viewer_can_download(client, viewer, project, curated):
    client.force_login(viewer)
    r = client.get(reverse("review_export", kwargs={"slug": project.slug}), {"format": "openai-chat"})
    assert b"".join(r.streaming_content) == expected_openai_bytes()


def test_dataset_page_counts_and_hash(owner_client, project, curated):
    from projects.selectors import curated_dataset_sha256

    body = owner_client.get(reverse("review_dataset", kwargs={"slug": project.slug}), {"hash": "1"}).content.decode()
    sha, rows = curated_dataset_sha256(project)
    assert rows == 2 and sha in body and "<dd>2</dd>" in body


@pytest.mark.django_db(transaction=True)
def test_cli_export(project, owner, tmp_path):
    from tests.test_cli import distill, last_json

    s = make_samples(project, [{"query": JA, "response": "card_arrival", "parsed": "card_arrival"},
                               {"query": RU, "response": "x", "failed": [("label_in_set", "not a label")]}])
    review_decide(sample=s[1], user=owner, decision="accept", expected_version=0)
    out = tmp_path / "d.jsonl"
    r = distill("export", "--project", project.slug, "--format", "openai-chat", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert last_json(r) == {"rows": 2, "sha256": hashlib.sha256(data).hexdigest(), "path": str(out), "format": "openai-chat"}
    assert [json.loads(l)["messages"][1]["content"] for l in data.decode("utf-8").splitlines()] == ["card_arrival", "x"]
    r = distill("export", "--project", "nope", "--format", "hf-jsonl", "--out", str(out), "--json")
    assert r.returncode == 1 and "--project: no project with slug 'nope'" in r.stderr
    r = distill("export", "--project", project.slug, "--format", "hf-jsonl", "--out", str(tmp_path / "missing" / "x.jsonl"))
    assert r.returncode == 1 and "out: cannot write" in r.stderr


def test_generating_twice_keeps_one_row_per_query_and_teacher(project, owner, tmp_path):
    """Two generation runs over the same train queries do not duplicate them in the curated
    dataset: per (query, teacher) the sample kept is one a human accepted or edited, else the
    latest run's; another teacher's answer to the same query is its own row. Export, training
    rows, the recorded sha256 and row count all see the same four rows."""
    from projects.models import TrainingRun
    from projects.selectors import curated_dataset_rows, curated_dataset_sha256, curated_samples
    from projects.services.training import training_start
    from workers.runs.training import training_rows

    a, b, c = "Where is my new card?", "My refund is missing", "Someone stole my card"
    a1, b1, c1 = make_samples(project, [
        {"query": a, "response": "card_arrival", "parsed": "card_arrival"},
        {"query": b, "response": "refund?", "failed": [("label_in_set", "not a label")]},
        {"query": c, "response": "lost_or_stolen_card", "parsed": "lost_or_stolen_card"},
    ])
    review_decide(sample=b1, user=owner, decision="edit", edited_response="refund_not_showing_up", expected_version=0)
    a2, b2, a2_llama = make_samples(project, [
        {"query": a, "response": "lost_or_stolen_card", "parsed": "lost_or_stolen_card"},
        {"query": b, "response": "card_arrival", "parsed": "card_arrival"},
        {"query": a, "response": "card_arrival", "parsed": "card_arrival", "teacher": "llama"},
    ], run_split="train")
    [a3] = make_samples(project, [{"query": a, "response": "refund_not_showing_up", "parsed": "refund_not_showing_up"}])
    review_decide(sample=a3, user=owner, decision="reject", expected_version=0)  # a human rejected the newest one

    expected = [(b1.pk, b, "refund_not_showing_up", "gpt-teacher"), (c1.pk, c, "lost_or_stolen_card", "gpt-teacher"),
                (a2.pk, a, "lost_or_stolen_card", "gpt-teacher"), (a2_llama.pk, a, "card_arrival", "llama")]
    assert [s.pk for s in curated_samples(project)] == [e[0] for e in expected]
    assert [(r["sample_id"], r["query"], r["answer"], r["teacher"]) for r in curated_dataset_rows(project)] == expected

    out = tmp_path / "d.jsonl"
    res = curated_dataset_export(project=project, fmt="openai-chat", path=out)
    assert res["rows"] == 4
    assert [(json.loads(l)["messages"][0]["content"], json.loads(l)["messages"][1]["content"])
            for l in out.read_text("utf-8").splitlines()] == [(f"Label: {q}", ans) for _, q, ans, _ in expected]

    h = hashlib.sha256()
    for _, q, ans, _ in expected:
        h.update(json.dumps([q, ans, ans, None], ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    assert curated_dataset_sha256(project) == (h.hexdigest(), 4)

    train, val, _ = training_rows(run=TrainingRun(project=project, method="sft-lora"))
    assert [(r.query, r.answer) for r in train + val] == [(q, ans) for _, q, ans, _ in expected]
    run = training_start(project=project, method="sft-lora", user=owner)
    assert (run.dataset_rows, run.dataset_sha256) == (4, h.hexdigest())
