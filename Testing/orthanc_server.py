"""A real Orthanc PACS for the tests and the PACS benchmark (issue 29): started on 127.0.0.1 with
free ports, a temporary configuration and storage folder, and stopped afterwards.

Orthanc comes from the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``.ci/run`` installs
them as root). :func:`orthanc_missing` says why a test cannot run (no ``Orthanc`` binary, no
DICOMweb plugin, no ``pynetdicom`` or ``dicomweb-client``); the tests skip with that reason.

The server:

* answers DIMSE as AE title :data:`ORTHANC_AET` on a free port, checks the called AE title
  (a wrong one is rejected: the association test), and lets any calling AE find, get and store;
  the test's own AE title :data:`CLIENT_AET` is registered in ``DicomModalities`` (C-GET and
  C-MOVE ask for a known modality in some Orthanc versions);
* answers HTTP on another free port, the DICOMweb plugin under ``/dicom-web/``, optionally with
  HTTP basic authentication (:data:`USER` / :data:`PASSWORD`);
* drops, with a Lua ``ReceivedInstanceFilter``, every SR whose PatientID starts with
  :data:`REJECT_SR_PATIENT` while :meth:`OrthancServer.reject_results` is on: the tests' reliable
  "the PACS refuses part of the result set" (STOW-RS and C-STORE alike; Orthanc 1.10 answers
  success for a filtered instance and does not keep it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

ORTHANC_AET = "ORTHANCTEST"
CLIENT_AET = "VFSCREENTEST"
USER, PASSWORD = "vfscreen", "s3cret-Pa55word"
"""HTTP basic-auth credentials of the test server (the credential tests look for the password in
every output)."""
REJECT_SR_PATIENT = "REJECT"
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
REJECT_FLAG = "reject-sr"
"""While this file exists in the server's folder, the Lua filter drops the SRs of patients
:data:`REJECT_SR_PATIENT`* (:meth:`OrthancServer.reject_results` switches it)."""


def lua_filter(folder: Path) -> str:
    flag = str(folder / REJECT_FLAG).replace("\\", "/")
    return f"""
function ReceivedInstanceFilter(dicom, origin, info)
  local patient = dicom.PatientID or ''
  if dicom.Modality == 'SR' and string.sub(patient, 1, {len(REJECT_SR_PATIENT)}) == '{REJECT_SR_PATIENT}' then
    local flag = io.open('{flag}', 'r')
    if flag then
      flag:close()
      return false
    end
  end
  return true
end
"""


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_FOLDERS:
        candidate = Path(folder) / "libOrthancDicomWeb.so"
        if candidate.exists():
            return candidate
    return None


def orthanc_missing() -> str | None:
    """Why a real-Orthanc test cannot run here, or None when it can."""
    if orthanc_binary() is None:
        return "the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    for module, package in (("pynetdicom", "pynetdicom"), ("dicomweb_client", "dicomweb-client")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed (pip install '.[pacs]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OrthancServer:
    """A running Orthanc: its ports, folder and process."""

    http_port: int
    dicom_port: int
    folder: Path
    process: subprocess.Popen
    authenticated: bool
    certificate: Path | None = None
    """The self-signed certificate (PEM) of its DICOM TLS and of the https proxy in front of it."""
    proxy: object | None = None

    @property
    def url(self) -> str:
        """Orthanc's own REST API (plain http, for the tests' set-up)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root: through the https proxy when there is one."""
        if self.proxy is not None:
            return f"https://127.0.0.1:{self.proxy.server_address[1]}/dicom-web"
        return f"{self.url}/dicom-web"

    def rest(self, path: str, method: str = "GET", data: bytes | None = None):
        """Orthanc's REST API (``/studies``, ``/tools/find``...): the decoded JSON answer."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.authenticated:
            token = b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def upload(self, paths) -> None:
        for path in paths:
            self.rest("/instances", "POST", Path(path).read_bytes())

    def clear(self) -> None:
        for patient in self.rest("/patients"):
            self.rest(f"/patients/{patient}", "DELETE")

    def find(self, level: str, query: dict) -> list[dict]:
        """``/tools/find`` with expanded answers (``MainDicomTags``, ``ID``...)."""
        body = json.dumps({"Level": level, "Query": query, "Expand": True}).encode()
        return self.rest("/tools/find", "POST", body)

    def reject_results(self, reject: bool) -> None:
        """Whether the SRs of patients ``REJECT*`` are dropped (on at start)."""
        flag = self.folder / REJECT_FLAG
        if reject:
            flag.write_text("")
        elif flag.exists():
            flag.unlink()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """``(certificate, key)``: a self-signed certificate for 127.0.0.1, made with openssl; it is its
    own authority (the CA bundle a client needs)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def https_proxy(target: str, certificate: Path, key: Path):
    """A TLS-terminating reverse proxy on 127.0.0.1 (a free port) in front of ``target``
    (``http://host:port``), serving in a daemon thread: what a hospital puts in front of a PACS.
    (Debian's Orthanc 1.10 resets https connections after the handshake with OpenSSL 3, so its own
    ``SslEnabled`` cannot serve here.)"""
    import http.server
    import threading

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(target + self.path, data=body, method=self.command)
            for name, value in self.headers.items():
                if name.lower() not in ("host", "content-length", "connection", "accept-encoding"):
                    request.add_header(name, value)
            try:
                answer = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as error:
                answer = error
            data = answer.read()
            self.send_response(answer.status if hasattr(answer, "status") else answer.code)
            for name, value in answer.headers.items():
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def configuration(folder: Path, http_port: int, dicom_port: int, client_port: int, authenticated: bool) -> dict:
    """Orthanc's configuration for a test server (module docstring)."""
    plugin = dicomweb_plugin()
    config = {
        "Name": "vfscreen-test", "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET, "DicomCheckCalledAet": True, "RemoteAccessAllowed": False,
        "HttpServerEnabled": True, "SslEnabled": False, "HttpTimeout": 60, "StableAge": 1,
        "AuthenticationEnabled": authenticated, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        "DicomModalities": {"vfscreen": {"AET": CLIENT_AET, "Host": "127.0.0.1", "Port": client_port,
                                         "AllowGet": True, "AllowMove": True, "AllowStore": True,
                                         "AllowFind": True, "AllowEcho": True}},
        "Plugins": [str(plugin.parent)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "LuaScripts": [str(folder / "filter.lua")], "ConcurrentJobs": 2, "LimitFindResults": 0,
        "LimitFindInstances": 0, "SaveJobs": False, "LogExportedResources": False,
    }
    if authenticated:
        config["RegisteredUsers"] = {USER: PASSWORD}
    return config


def start_orthanc(folder=None, authenticated: bool = False, client_port: int | None = None,
                  timeout: float = 60.0, tls: bool = False) -> OrthancServer:
    """Start Orthanc in ``folder`` (a new temporary folder when None) and wait until its REST API
    answers; raises RuntimeError with the end of its log when it does not start. ``tls``: a
    self-signed certificate (:func:`self_signed_certificate`) for DIMSE over TLS (Orthanc's
    ``DicomTls*`` options; every association on its DICOM port then uses TLS) and for DICOMweb
    through an https proxy (:func:`https_proxy`)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="vfscreen-orthanc-"))
    (folder / "storage").mkdir(parents=True, exist_ok=True)
    (folder / "filter.lua").write_text(lua_filter(folder))
    (folder / REJECT_FLAG).write_text("")
    http_port, dicom_port = free_port(), free_port()
    config = configuration(folder, http_port, dicom_port, client_port or free_port(), authenticated)
    certificate = key = None
    if tls:
        certificate, key = self_signed_certificate(folder)
        config.update(DicomTlsEnabled=True, DicomTlsCertificate=str(certificate), DicomTlsPrivateKey=str(key),
                      DicomTlsTrustedCertificates=str(certificate), DicomTlsRemoteCertificateRequired=False)
    (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([orthanc_binary(), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=folder, env={**os.environ, "LANG": "C"})
    log.close()
    server = OrthancServer(http_port, dicom_port, folder, process, authenticated)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            server.rest("/system")
            if tls:
                server.certificate, server.proxy = certificate, https_proxy(server.url, certificate, key)
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start in {timeout:.0f} s; its log ends with:\n{tail}")
