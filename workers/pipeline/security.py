"""What a team's settings may point at: model names, teacher key variables and teacher URLs.

No Django here: the web services call these checks when a setting is saved, and the worker calls
them again right before it loads a model, reads a key or sends a request, so a row that somehow
holds a bad value is still refused there. The operator's choices come in a ``SecurityPolicy``
(``SecurityPolicy.from_env`` reads the environment variables documented in distillhub/settings.py).

- Model names (a student, a local teacher, a judge): a bundled short name, a Hugging Face hub id
  ``org/name``, or a folder under a directory of ``policy.model_dirs`` (the operator's
  ``DISTILLHUB_MODEL_DIRS``; on the worker also the artifact folders of the run's own project,
  which the services resolve from ``artifact:<id>``). Any other path is refused: absolute paths
  outside those directories, ``~``, ``.``/``..`` segments, backslashes, and a name shaped like a
  hub id that exists as a file or folder here (``from_pretrained`` would load it from disk).
- Teacher keys: ``api_key_env`` must name a variable on the operator's list
  (``DISTILLHUB_TEACHER_KEY_ENVS``, default ``OPENAI_API_KEY``); a value shaped like a key itself
  is refused without being echoed.
- Teacher URLs: ``http``/``https`` only, no credentials in the URL, and every address the host
  resolves to must be public. ``DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS`` allows loopback, private
  and unique-local addresses (local vLLM, Ollama, llama.cpp); link-local (cloud metadata at
  169.254.169.254), multicast, unspecified and reserved addresses stay refused unless the host or
  a CIDR holding them is listed in ``DISTILLHUB_TEACHER_URL_ALLOW``. The worker resolves again
  right before it sends requests, because DNS answers can change after the setting was saved.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from workers.pipeline.registry import BUNDLED

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# org/name as the Hugging Face hub spells repository ids (no "..", no leading dot or dash).
HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,95})/[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,95})$")
# Prefixes of API keys and tokens people paste by mistake (OpenAI, Hugging Face, Groq, xAI,
# GitHub, GitLab, Google).
SECRET_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "xai-", "ghp_", "gho_", "github_pat_", "glpat-", "AIza", "Bearer ")
DEFAULT_TEACHER_KEY_ENVS = ("OPENAI_API_KEY",)
NEVER_PASTE = ("give the NAME of the environment variable that holds the key (e.g. OPENAI_API_KEY): "
               "name the environment variable, never paste the key")


class Refused(ValueError):
    """A setting points at something it may not use. The message starts with the field's name
    and says what is allowed; it never repeats a value that looks like a secret."""


@dataclass(frozen=True)
class SecurityPolicy:
    """The operator's choices. ``model_dirs``: absolute real paths of directories whose folders
    may be loaded as models; ``teacher_key_envs``: variable names a teacher may read its key
    from; ``allow_private_teacher_urls``: loopback / private / unique-local teacher addresses are
    allowed; ``teacher_url_allow``: host names and CIDRs a teacher URL may reach whatever their
    addresses."""

    model_dirs: tuple[str, ...] = ()
    teacher_key_envs: tuple[str, ...] = DEFAULT_TEACHER_KEY_ENVS
    allow_private_teacher_urls: bool = False
    teacher_url_allow: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SecurityPolicy":
        """The policy from ``DISTILLHUB_MODEL_DIRS``, ``DISTILLHUB_TEACHER_KEY_ENVS``,
        ``DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS`` and ``DISTILLHUB_TEACHER_URL_ALLOW`` (lists are
        comma-separated; unset or empty gives the default). Raises ValueError naming the variable
        for a malformed value."""
        env = os.environ if environ is None else environ
        return cls(model_dirs=parse_model_dirs(env.get("DISTILLHUB_MODEL_DIRS", "")),
                   teacher_key_envs=parse_key_envs(env.get("DISTILLHUB_TEACHER_KEY_ENVS", "")),
                   allow_private_teacher_urls=parse_bool("DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS",
                                                         env.get("DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS", "")),
                   teacher_url_allow=parse_url_allow(env.get("DISTILLHUB_TEACHER_URL_ALLOW", "")))

    def with_model_dirs(self, *dirs: str) -> "SecurityPolicy":
        """A copy that also allows the folders ``dirs`` (absolute paths), e.g. the artifact
        folders of the project a worker runs for."""
        extra = tuple(os.path.realpath(d) for d in dirs if d)
        return replace(self, model_dirs=self.model_dirs + tuple(d for d in extra if d not in self.model_dirs))


def _items(raw: str) -> list[str]:
    return [x.strip() for x in (raw or "").split(",") if x.strip()]


def parse_model_dirs(raw: str) -> tuple[str, ...]:
    """``DISTILLHUB_MODEL_DIRS``: comma-separated absolute directories (real paths returned).
    Raises ValueError for a relative one."""
    out = []
    for d in _items(raw):
        if not os.path.isabs(os.path.expanduser(d)) or d.startswith("~"):
            raise ValueError(f"DISTILLHUB_MODEL_DIRS: {d!r} is not an absolute directory")
        out.append(os.path.realpath(d))
    return tuple(out)


def parse_key_envs(raw: str) -> tuple[str, ...]:
    """``DISTILLHUB_TEACHER_KEY_ENVS``: comma-separated variable names, default
    ``OPENAI_API_KEY``. Raises ValueError for a value that is not a variable name."""
    names = _items(raw)
    for n in names:
        if not ENV_NAME.match(n) or looks_like_secret(n):
            raise ValueError("DISTILLHUB_TEACHER_KEY_ENVS: list variable NAMES (e.g. OPENAI_API_KEY), "
                             "never the keys themselves")
    return tuple(names) or DEFAULT_TEACHER_KEY_ENVS


def parse_bool(name: str, raw: str) -> bool:
    value = (raw or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off.")


def parse_url_allow(raw: str) -> tuple[str, ...]:
    """``DISTILLHUB_TEACHER_URL_ALLOW``: comma-separated host names and CIDRs (``10.0.5.0/24``,
    ``fd00::/8``, ``127.0.0.1``). Raises ValueError for an entry that is neither."""
    out = []
    for item in _items(raw):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
            continue
        except ValueError:
            pass
        if not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$", item):
            raise ValueError(f"DISTILLHUB_TEACHER_URL_ALLOW: {item!r} is neither a host name nor a CIDR")
        out.append(item.lower().rstrip("."))
    return tuple(out)


# --- model names --------------------------------------------------------------------------------


def _inside(path: str, dirs: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def check_model_name(name: str, *, policy: SecurityPolicy, field: str = "model") -> str:
    """Return what may be loaded for ``name``: the bundled short name, the hub id, or the real
    path of a folder inside ``policy.model_dirs``. Raises Refused naming ``field`` for anything
    else (see the module docstring)."""
    name = (name or "").strip()
    if not name:
        raise Refused(f"{field}: give a model (a bundled name such as {BUNDLED[0]}, or a Hugging Face id org/name)")
    if name in BUNDLED:
        return name
    allowed = (f"{field}: {name[:200]!r} is not a bundled model ({', '.join(BUNDLED)}), a Hugging Face id "
               "(org/name) or an artifact of this project (artifact:<id>)")
    if "\\" in name or "\x00" in name or name.startswith("~"):
        raise Refused(f"{allowed}; paths are refused")
    if os.path.isabs(name):
        if any(seg in (".", "..") for seg in name.split("/")) or not _inside(name, policy.model_dirs):
            raise Refused(f"{allowed}; a local folder is allowed only under a directory the operator lists in "
                          "DISTILLHUB_MODEL_DIRS")
        return os.path.realpath(name)
    if not HUB_ID.match(name) or ".." in name or name.endswith("."):
        raise Refused(f"{allowed}; paths are refused")
    if os.path.lexists(name):
        raise Refused(f"{field}: {name!r} exists as a file or folder on this machine, so it would be loaded from "
                      "disk instead of the Hugging Face hub; refused")
    return name


# --- teacher keys -------------------------------------------------------------------------------


def looks_like_secret(value: str) -> bool:
    """True when ``value`` looks like an API key or token rather than a variable name: a known
    key prefix (``sk-``, ``hf_``, ``gsk_``, ...), or a long (20+ characters) string that mixes
    lower-case letters and digits, or 32+ characters without an underscore. Conventional names
    (``OPENAI_API_KEY``, ``AZURE_OPENAI_KEY_2``) are upper-case words joined by underscores."""
    v = (value or "").strip()
    if v.startswith(SECRET_PREFIXES):
        return True
    if len(v) >= 20 and any(c.islower() for c in v) and any(c.isdigit() for c in v):
        return True
    return len(v) >= 32 and "_" not in v


def check_key_env(name: str, *, policy: SecurityPolicy, field: str = "api_key_env") -> str:
    """Return ``name`` (empty: the teacher sends no key) when it is on the operator's list.
    Raises Refused naming ``field`` for a key pasted instead of a name, a malformed name or a
    name not on ``policy.teacher_key_envs``."""
    name = (name or "").strip()
    if not name:
        return ""
    if looks_like_secret(name) or not ENV_NAME.match(name):
        raise Refused(f"{field}: {NEVER_PASTE}")
    if name not in policy.teacher_key_envs:
        raise Refused(f"{field}: {name} is not one of the key variables the operator allows "
                      f"({', '.join(policy.teacher_key_envs) or 'none'}); use one of them, or ask the operator "
                      "to add it to DISTILLHUB_TEACHER_KEY_ENVS")
    return name


# --- teacher URLs -------------------------------------------------------------------------------

# Never allowed by DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS alone (only by listing them).
_ALWAYS_BLOCKED = ("unspecified", "multicast", "link-local", "reserved")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``public``, or why a teacher may not reach ``ip`` by default: ``unspecified``,
    ``multicast``, ``link-local``, ``loopback``, ``private`` (RFC 1918, unique-local fc00::/7),
    ``reserved`` or ``non-public`` (e.g. 100.64.0.0/10, documentation ranges). An IPv4-mapped
    IPv6 address is judged as its IPv4 address."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip.is_loopback:
        return "loopback"
    if ip.is_reserved or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-public"
    return "public"


def _listed(ip, host: str, policy: SecurityPolicy) -> bool:
    for item in policy.teacher_url_allow:
        if "/" in item:
            net = ipaddress.ip_network(item, strict=False)
            cand = ip.ipv4_mapped if (ip.version == 6 and ip.ipv4_mapped is not None) else ip
            if cand.version == net.version and cand in net:
                return True
        elif item == host:
            return True
    return False


def check_teacher_url(url: str, *, policy: SecurityPolicy, field: str = "base_url", require_resolution: bool = False,
                      getaddrinfo: Callable = socket.getaddrinfo) -> str:
    """Return ``url`` (empty: the provider's default endpoint) when a teacher may send requests
    to it. Every address the host resolves to is checked (``address_class``). A host that does
    not resolve passes when ``require_resolution`` is False (when a setting is saved: the worker
    checks again) and is refused when True (on the worker, right before requests). Raises
    Refused naming ``field``."""
    url = (url or "").strip()
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused(f"{field}: {url[:200]!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"{field}: {url[:200]!r} must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise Refused(f"{field}: put no user name or password in the URL; name the key's environment variable "
                      "in api_key_env")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise Refused(f"{field}: {url[:200]!r} has no host")
    if host in policy.teacher_url_allow:
        return url
    literal = True
    try:
        addresses = {ipaddress.ip_address(host.split("%")[0])}
    except ValueError:
        literal = False
        try:
            infos = getaddrinfo(host, port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM)
            addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
        except (OSError, UnicodeError, ValueError):
            if require_resolution:
                raise Refused(f"{field}: the host {host} does not resolve") from None
            return url
        if not addresses:
            if require_resolution:
                raise Refused(f"{field}: the host {host} does not resolve")
            return url
    for ip in sorted(addresses, key=str):
        kind = address_class(ip)
        if kind == "public" or _listed(ip, host, policy):
            continue
        if policy.allow_private_teacher_urls and kind not in _ALWAYS_BLOCKED:
            continue
        where = f"{ip} is" if literal else f"{host} resolves to {ip},"
        article = "an" if kind[0] in "aeiou" else "a"
        hint = ("the operator allows it by listing the host or its CIDR in DISTILLHUB_TEACHER_URL_ALLOW"
                if kind in _ALWAYS_BLOCKED else
                "the operator allows such addresses with DISTILLHUB_ALLOW_PRIVATE_TEACHER_URLS=1 (or lists the host "
                "or its CIDR in DISTILLHUB_TEACHER_URL_ALLOW)")
        raise Refused(f"{field}: {where} {article} {kind} address; teachers may only reach public addresses unless {hint}")
    return url
