"""DistillHub settings: one module, driven by environment variables.

Variables (all optional; defaults suit one machine with local PostgreSQL and Redis):

- ``DATABASE_URL``  PostgreSQL URL, default ``postgres://postgres@127.0.0.1:5432/distillhub``.
- ``REDIS_URL``     Redis URL for the Celery broker, default ``redis://127.0.0.1:6379/0``.
- ``DISTILLHUB_DATA_DIR``  uploads, model artifacts and the generated secret key;
  default ``<repo>/.data``.
- ``DISTILLHUB_MODEL_CACHE``  converted bundled models (e.g. SmolLM2 from GGUF);
  default ``<data dir>/models``.
- ``SECRET_KEY``    when unset, generated once into ``<data dir>/secret_key``.
- ``DEBUG``         ``1``/``true``/``yes`` turns it on; off otherwise.
- ``ALLOWED_HOSTS`` comma-separated, default ``127.0.0.1,localhost``.
- ``DISTILLHUB_MAX_UPLOAD_MB``  largest accepted upload, default 1024 (MB).
- ``DISTILLHUB_STALE_JOB_SECONDS``  a running job whose heartbeat is older is marked failed,
  default 600 (s).
- ``DISTILLHUB_LOGIN_FAILURE_LIMIT``  wrong passwords for one username from one IP address
  before its logins are refused (django-axes), default 5.
- ``DISTILLHUB_LOGIN_COOLOFF_MINUTES``  how long such a lock lasts, default 15 (minutes).
  An operator unlocks sooner with ``manage.py axes_reset_username NAME`` (or ``axes_reset``
  for everyone); the client address is ``REMOTE_ADDR``, so a reverse proxy in front must pass
  the real one through (see django-axes' ``AXES_IPWARE_*`` settings).

What a team's settings may point at (checked when saved and again on the worker; see
workers/pipeline/security.py):

- ``DISTILLHUB_MODEL_DIRS``  comma-separated absolute directories whose model folders may be
  named by path as a student or local teacher; default empty: only bundled names
  (``smollm2-135m-instruct``, ``minilm-l6``), Hugging Face ids (``org/name``) and the project's
  own artifacts (``artifact:<id>``).
- ``DISTILLHUB_TEACHER_KEY_ENVS``  comma-separated names of the workers' environment variables
  a teacher's ``api_key_env`` may name; default ``OPENAI_API_KEY``.
- ``DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS``  boolean, default off: teacher ``base_url``s may
  reach loopback, private (10/8, 172.16/12, 192.168/16) and unique-local (fc00::/7) addresses,
  e.g. a local vLLM, Ollama or llama.cpp server at 127.0.0.1. Link-local (169.254/16, fe80::/10:
  cloud metadata), multicast, unspecified and reserved addresses stay refused.
- ``DISTILLHUB_TEACHER_URL_ALLOW``  comma-separated host names and CIDRs a teacher ``base_url``
  may reach whatever their addresses (e.g. ``vllm,10.0.5.0/24``); default empty.

A malformed value raises ``ImproperlyConfigured`` naming the variable.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from distillhub.secret_files import read_or_create_secret

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off.")


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}.")
    return value


DEBUG = _env_bool("DEBUG", False)

DATA_DIR = Path(os.environ.get("DISTILLHUB_DATA_DIR") or (BASE_DIR / ".data")).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(f"DISTILLHUB_DATA_DIR={str(DATA_DIR)!r} cannot be created: {exc}") from None
MODEL_CACHE_DIR = Path(os.environ.get("DISTILLHUB_MODEL_CACHE") or (DATA_DIR / "models")).resolve()


def _secret_key() -> str:
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    key = read_or_create_secret(path, nbytes=50)
    if not key:
        raise ImproperlyConfigured(f"{path} is empty; delete it or set SECRET_KEY.")
    return key


SECRET_KEY = _secret_key()

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h.strip()]

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/distillhub")
try:
    _db = dj_database_url.parse(DATABASE_URL, conn_max_age=0)
except Exception as exc:  # dj_database_url raises plain ValueError/KeyError on bad URLs
    raise ImproperlyConfigured(f"DATABASE_URL={DATABASE_URL!r} is not a database URL: {exc}") from None
if _db.get("ENGINE") != "django.db.backends.postgresql":
    raise ImproperlyConfigured(f"DATABASE_URL={DATABASE_URL!r} must be a postgres:// URL (DistillHub needs PostgreSQL).")
DATABASES = {"default": _db}

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
if urlparse(REDIS_URL).scheme not in {"redis", "rediss"}:
    raise ImproperlyConfigured(f"REDIS_URL={REDIS_URL!r} must be a redis:// or rediss:// URL.")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.contrib.postgres",
    "projects",
    "axes",
]

MIDDLEWARE = [
    # First: refuses an oversized body (413) from its Content-Length, before anything reads it.
    "distillhub.request_limits.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "distillhub.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]
WSGI_APPLICATION = "distillhub.wsgi.application"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "project_list"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes): failed logins are counted per (username, IP address) in the
# database; at the limit that pair is refused, even with the right password, for the cool-off.
# The Axes backend goes first so it can refuse before the password is checked; it needs the
# request, so code that authenticates must pass it (tests use client.force_login).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = _env_int("DISTILLHUB_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=_env_int("DISTILLHUB_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)


def _plotly_static_dir() -> Path:
    # plotly.js is served from the installed `plotly` package, so it is vendored without a copy in git.
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data"


STATICFILES_DIRS = [BASE_DIR / "static", ("plotly", _plotly_static_dir())]
# Whitenoise serves static files straight from the finders, so `collectstatic` is optional.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "media/"
STORAGES = {
    # Uploads and artifacts go through Django's storage API, so an S3-compatible backend
    # (django-storages) can replace the disk when workers run on several machines.
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

MAX_UPLOAD_MB = _env_int("DISTILLHUB_MAX_UPLOAD_MB", 1024, minimum=1)
# Uploads larger than this stream to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# The largest request body of every URL but the upload view (which takes MAX_UPLOAD_MB):
# enforced from Content-Length before the body is read (distillhub/request_limits.py).
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_TEMP_DIR = None
STALE_JOB_SECONDS = _env_int("DISTILLHUB_STALE_JOB_SECONDS", 600, minimum=10)


def _security_policy():
    from workers.pipeline.security import SecurityPolicy  # stdlib only: no app imports at settings time

    try:
        return SecurityPolicy.from_env(os.environ)
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None


_policy = _security_policy()
MODEL_DIRS = list(_policy.model_dirs)
TEACHER_KEY_ENVS = list(_policy.teacher_key_envs)
ALLOW_PRIVATE_TEACHER_URLS = _policy.allow_private_teacher_urls
TEACHER_URL_ALLOW = list(_policy.teacher_url_allow)

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = REDIS_URL
# Results live in Postgres (the Job row); Celery keeps none, so Redis does not grow.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# No global time limits: a training job may run for hours and must not be killed by Celery.
CELERY_TASK_TIME_LIMIT = None
CELERY_TASK_SOFT_TIME_LIMIT = None
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 6 * 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULE = {
    "jobs-mark-stale": {"task": "workers.tasks.jobs_mark_stale_task", "schedule": 60.0},
    # Catches up a search index whose run after an import was lost (broker down, worker killed).
    "search-index-catch-up": {"task": "workers.tasks.ingest_search_catch_up_task", "schedule": 300.0},
    # Serving: harvest gateway logs, the promote rule, continuous distillation.
    "serving-tick": {"task": "workers.tasks.serving_tick_task", "schedule": 60.0},
    # Sweeps: advances a sweep whose advance after a trial's end was lost (broker down, worker killed).
    "sweep-catch-up": {"task": "workers.tasks.sweep_catch_up_task", "schedule": 300.0},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"},
                # failures and lockouts are warnings; its start-up banner (info) would add a
                # line to every `distill` command's stderr
                "axes": {"level": "WARNING"}},
}
