"""``python manage.py distill <verb>``: every step of the loop without the browser.

Exit status: 0 on success, 1 when the input or state is at fault (one line on stderr naming the
row, field or setting), 2 for usage errors. With ``--json`` the last line of stdout is one JSON
object. See ../shared/CONTRACT.md."""
from __future__ import annotations

import argparse
import importlib
import sys

from django.core.management.base import BaseCommand, CommandError

from projects.cli import CliError, emit
from projects.services import ServiceError

# Verb modules under projects/cli/; each one that exists is registered.
VERB_MODULES = ["foundation", "ingest", "generation", "review", "training", "sweeps", "artifacts", "evaluation", "demo",
                "serving"]


class Command(BaseCommand):
    help = ("Run a step of the distillation loop: team, user, project, import, teacher, generate, export, train, sweep, "
            "export-gguf, evaluate, job, demo.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        sub = parser.add_subparsers(dest="verb", required=True, parser_class=argparse.ArgumentParser)
        for name in VERB_MODULES:
            try:
                mod = importlib.import_module(f"projects.cli.{name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"projects.cli.{name}":
                    continue
                raise
            mod.register(sub)
        # Allow --json after the verb too (e.g. `distill team create x --json`).
        for action in sub.choices.values():
            _add_json_everywhere(action)

    def handle(self, *args, **options) -> None:
        handler = options.get("handler")
        if handler is None:
            raise CommandError("no verb given", returncode=2)
        options["json"] = bool(options.get("json") or options.get("json_late"))
        try:
            result = handler(options)
        except (CliError, ServiceError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(1)
        if result is not None:
            emit(options, result, result.pop("_human", None) if isinstance(result, dict) else None)


def _add_json_everywhere(parser: argparse.ArgumentParser) -> None:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        for p in subs[0].choices.values():
            _add_json_everywhere(p)
    elif not any("--json" in a.option_strings for a in parser._actions):
        parser.add_argument("--json", dest="json_late", action="store_true", help="print one JSON object as the last line")
