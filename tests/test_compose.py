"""docker-compose.yml declares the whole stack (docker itself does not run on CI machines, so
the file is checked structurally here; `docker compose config` accepts it where docker runs)."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_compose_declares_every_service():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"web", "worker", "worker-gpu", "beat", "gateway", "postgres", "redis"}
    gpu = services["worker-gpu"]
    assert "-Q gpu" in gpu["command"] and "--max-tasks-per-child 1" in gpu["command"] and "--concurrency 1" in gpu["command"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["capabilities"] == ["gpu"] and devices["driver"] == "nvidia"
    assert "celery -A distillhub beat" in services["beat"]["command"]
    assert "distill gateway --host 0.0.0.0" in services["gateway"]["command"]
    for name in ("web", "worker", "worker-gpu", "beat", "gateway"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith("redis://")
