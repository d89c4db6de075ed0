"""Verb: ``export-gguf`` (a merged student to one GGUF file for llama.cpp)."""
from __future__ import annotations

from pathlib import Path

from projects.cli import CliError
from projects.models import ModelArtifact
from projects.services.artifacts import artifact_export_gguf
from projects.services.security import artifact_folder
from workers.pipeline.gguf_export import OUTTYPES


def register(sub) -> None:
    p = sub.add_parser("export-gguf", help="export a merged student artifact to GGUF (llama.cpp, Ollama)")
    p.add_argument("--artifact", required=True, help="the merged artifact: ID or artifact:ID")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                   help="matrix type: f32, f16 (default) or q8_0 (8-bit, about 4x smaller than f32)")
    p.add_argument("--out", default="", help="also copy the .gguf file to this path")
    p.set_defaults(handler=cmd_export_gguf)


def cmd_export_gguf(o: dict) -> dict:
    raw = str(o["artifact"]).strip().removeprefix("artifact:")
    if not raw.isdigit():
        raise CliError(f"--artifact: {o['artifact']!r} is not an artifact id (a number or artifact:ID)")
    src = ModelArtifact.objects.select_related("project", "training_run").filter(pk=int(raw)).first()
    if src is None:
        raise CliError(f"--artifact: no artifact with id {raw}")
    art = artifact_export_gguf(artifact=src, outtype=o["outtype"], copy_to=o["out"] or None)
    file = artifact_folder(artifact=art)
    out = str(Path(o["out"]).resolve()) if o["out"] else file
    result = {"artifact": art.pk, "kind": art.kind, "source_artifact": src.pk, "run": art.training_run_id,
              "outtype": o["outtype"], "path": art.path, "file": file, "out": out, "size_bytes": art.size_bytes,
              "sha256": art.sha256,
              "serve": f"python -m llama_cpp.server --model {out} --model_alias artifact-{art.pk}"}
    result["_human"] = (f"artifact:{art.pk} (gguf, {o['outtype']}, {art.size_bytes} bytes) from artifact:{src.pk}\n"
                        f"file: {out}\nsha256: {art.sha256}\nserve: {result['serve']}")
    return result
