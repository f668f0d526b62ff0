"""Where the PACS is and how to reach it: one configuration from a JSON file, environment variables
and the command line (``docs/pacs.md``).

Sources, later ones winning key by key: the JSON file (``--config FILE``, or the file
``VFS_PACS_CONFIG`` names), then the environment variables of :data:`ENVIRONMENT`, then the
command line's own options. A password is read from the file or ``VFS_PACS_PASSWORD`` only, never
from the command line (other users see a process's arguments), and no message, log line or
``repr`` ever shows it: :meth:`PacsConfig.describe` names the server without credentials, and a URL
that carries a user or password (``https://user:secret@host``) is refused, since it would be
printed wherever the URL is.

Protocol: ``dicomweb`` (QIDO-RS, WADO-RS, STOW-RS under ``url``) or ``dimse`` (C-FIND, C-GET,
C-STORE at ``host``:``port`` as ``called_aet``, from ``calling_aet``). When ``protocol`` is not
given it follows from what is: a ``url`` means DICOMweb, a ``host`` DIMSE.

TLS: an ``https`` URL is verified against the system's certificate authorities or ``ca_bundle``
(a PEM file); ``client_cert`` and ``client_key`` add a client certificate. DIMSE over TLS
(``tls = true``) uses the same three keys with pynetdicom's TLS support.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import VFSError

PROTOCOLS = ("dicomweb", "dimse")
DEFAULT_CALLING_AET = "VFSCREEN"
DEFAULT_TIMEOUT_S = 60.0
"""Seconds to wait for a connection or an answer before the server counts as unreachable."""
ENVIRONMENT = {
    "protocol": "VFS_PACS_PROTOCOL", "url": "VFS_PACS_URL", "username": "VFS_PACS_USERNAME",
    "password": "VFS_PACS_PASSWORD", "ca_bundle": "VFS_PACS_CA_BUNDLE", "client_cert": "VFS_PACS_CLIENT_CERT",
    "client_key": "VFS_PACS_CLIENT_KEY", "host": "VFS_PACS_HOST", "port": "VFS_PACS_PORT",
    "called_aet": "VFS_PACS_CALLED_AET", "calling_aet": "VFS_PACS_CALLING_AET", "tls": "VFS_PACS_TLS",
    "timeout_s": "VFS_PACS_TIMEOUT",
}
"""Configuration key → the environment variable that sets it."""
CONFIG_VARIABLE = "VFS_PACS_CONFIG"
SECRET_KEYS = ("password",)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash, 1-16 characters


class PacsError(VFSError):
    """The PACS cannot be used as asked (unreachable, refuses the association or the login, has no
    CT series to screen, rejects a result): one sentence for the PACS administrator."""


@dataclass(frozen=True)
class PacsConfig:
    """How to reach one PACS (module docstring). ``password`` never appears in ``repr``."""

    protocol: str
    url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    host: str | None = None
    port: int | None = None
    called_aet: str | None = None
    calling_aet: str = DEFAULT_CALLING_AET
    tls: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    def describe(self) -> str:
        """The server in words, for messages: never a credential."""
        if self.protocol == "dicomweb":
            return f"the DICOMweb server {self.url}"
        return f"the DICOM server {self.called_aet}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


def load_config(path=None, overrides: dict | None = None, environ=None) -> PacsConfig:
    """The configuration from the file ``path`` (or ``$VFS_PACS_CONFIG``), the environment and
    ``overrides`` (the command line's options; None values are ignored), checked.

    Raises:
        PacsError: a missing or malformed file, an unknown key, or a value that cannot be used
            (the sentence names the key, never a credential's value).
    """
    environ = os.environ if environ is None else environ
    values: dict = {}
    path = path or environ.get(CONFIG_VARIABLE) or None
    if path is not None:
        values.update(_read_file(Path(path).expanduser()))
    values.update({key: environ[name] for key, name in ENVIRONMENT.items() if environ.get(name)})
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return _checked(values)


def _read_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PacsError(f"the PACS configuration file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PacsError(f"cannot read the PACS configuration file {path}: {getattr(error, 'strerror', None) or error}.") \
            from None
    except json.JSONDecodeError as error:  # its message quotes no value, only the position
        raise PacsError(f"the PACS configuration file {path} is not valid JSON (line {error.lineno}, column "
                        f"{error.colno}).") from None
    if not isinstance(data, dict):
        raise PacsError(f"the PACS configuration file {path} must hold one JSON object of keys and values.")
    known = {f.name for f in fields(PacsConfig)}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise PacsError(f"the PACS configuration file {path} has the unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; known keys: {', '.join(sorted(known))}.")
    return data


def _checked(values: dict) -> PacsConfig:
    """A :class:`PacsConfig` from raw values (text from the environment, JSON types from a file)."""
    protocol = values.get("protocol") or ("dicomweb" if values.get("url") else "dimse" if values.get("host") else None)
    if protocol not in PROTOCOLS:
        raise PacsError("no PACS configured: give a DICOMweb URL (--url, VFS_PACS_URL or \"url\" in --config) or a "
                        "DIMSE host and port (--host/--port, VFS_PACS_HOST/VFS_PACS_PORT)" if protocol is None else
                        f"protocol must be dicomweb or dimse, not {protocol!r}.")
    text = {k: str(v).strip() for k, v in values.items() if k not in ("port", "tls", "timeout_s") and v is not None}
    config = PacsConfig(protocol=protocol, **{k: v or None for k, v in text.items() if k != "protocol"},
                        port=_integer(values.get("port"), "port"), tls=_flag(values.get("tls")),
                        timeout_s=_seconds(values.get("timeout_s")))
    if not config.calling_aet:
        config = replace(config, calling_aet=DEFAULT_CALLING_AET)
    for key in ("ca_bundle", "client_cert", "client_key"):
        value = getattr(config, key)
        if value is not None and not Path(value).expanduser().is_file():
            raise PacsError(f"the PACS {key} {value} is not a file.")
    if (config.client_cert is None) != (config.client_key is None) and config.client_key is not None:
        raise PacsError("client_key needs client_cert (the client certificate).")
    return _checked_dicomweb(config) if protocol == "dicomweb" else _checked_dimse(config)


def _checked_dicomweb(config: PacsConfig) -> PacsConfig:
    url = config.url or ""
    match = re.match(r"^(https?)://([^/?#]+)", url, flags=re.IGNORECASE)
    if not match:
        raise PacsError("the DICOMweb URL must start with http:// or https:// and name a server "
                        "(e.g. https://pacs.example.org/dicom-web).")
    if "@" in match.group(2):
        raise PacsError("the DICOMweb URL must not hold a user name or password: set \"username\" and \"password\" in "
                        "the configuration file, or VFS_PACS_USERNAME and VFS_PACS_PASSWORD.")
    if (config.username is None) != (config.password is None):
        raise PacsError("DICOMweb basic authentication needs both username and password (one is missing).")
    if config.password is not None and match.group(1).lower() == "http" and not _is_loopback(match.group(2)):
        raise PacsError("refusing to send the PACS password over plain http to another machine: use an https URL.")
    return replace(config, url=url.rstrip("/"))


def _is_loopback(netloc: str) -> bool:
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    return host.strip("[]").lower() in ("localhost", "127.0.0.1", "::1")


def _checked_dimse(config: PacsConfig) -> PacsConfig:
    if not config.host or config.port is None:
        raise PacsError("the DIMSE protocol needs the PACS's host and port (--host/--port, \"host\"/\"port\" in the "
                        "configuration file, or VFS_PACS_HOST/VFS_PACS_PORT).")
    if not config.called_aet:
        raise PacsError("the DIMSE protocol needs the PACS's AE title (--called-aet, \"called_aet\", "
                        "VFS_PACS_CALLED_AET).")
    for key in ("called_aet", "calling_aet"):
        if not _AE_TITLE.match(getattr(config, key)):
            raise PacsError(f"{key} {getattr(config, key)!r} is not an AE title: 1 to 16 printable ASCII characters "
                            "without backslash.")
    return replace(config, username=None, password=None)  # DIMSE has none: the PACS knows AE title and address


def _integer(value, key: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise PacsError(f"the PACS {key} must be a whole number, not {value!r}.") from None
    if not 1 <= number <= 65535:
        raise PacsError(f"the PACS {key} must be between 1 and 65535, not {number}.")
    return number


def _flag(value) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise PacsError(f"tls must be true or false, not {value!r}.")


def _seconds(value) -> float:
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise PacsError(f"timeout_s must be a number of seconds, not {value!r}.") from None
    if not 0 < seconds <= 3600:
        raise PacsError(f"timeout_s must be between 0 and 3600 seconds, not {seconds:g}.")
    return seconds
