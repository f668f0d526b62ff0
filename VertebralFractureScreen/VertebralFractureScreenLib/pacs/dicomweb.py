"""DICOMweb: QIDO-RS to find, WADO-RS to copy a series, STOW-RS to store results
(``dicomweb-client`` over a ``requests`` session).

The session carries HTTP basic authentication when a user and password are configured, verifies
https against ``ca_bundle`` (or the system's authorities) and presents ``client_cert`` when given.
Series are asked for as stored (``transfer-syntax=*``): no transcoding on the server, so a
JPEG 2000 or JPEG-LS archive is copied bit for bit and read by SimpleITK (GDCM).

A STOW-RS request carries every result file at once; the answer lists what was stored and what
failed (FailedSOPSequence). Any failure raises :class:`.config.PacsError`; the instances the
server accepted stay there (the study is retried whole, with the same SOP Instance UIDs).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from .config import PacsConfig, PacsError
from .connection import (IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, PacsConnection, merged, plain_header, require,
                         save_dataset, sorted_studies)

AS_STORED = (("application/dicom", "*"),)
"""WADO-RS media type: DICOM Part 10 files in the transfer syntax the server stores them in."""


class DicomwebConnection(PacsConnection):
    """A DICOMweb server (module docstring)."""

    def __init__(self, config: PacsConfig):
        super().__init__(config)
        require("pydicom", "pydicom")
        api = require("dicomweb_client.api", "dicomweb-client")
        requests = require("requests", "requests")
        session = requests.Session()
        if config.username is not None:
            session.auth = (config.username, config.password)
        session.verify = str(Path(config.ca_bundle).expanduser()) if config.ca_bundle else True
        if config.ca_bundle:  # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own
            session.trust_env = False  # bundle: the configured one must win; proxies still come from the environment
            session.proxies.update(requests.utils.get_environ_proxies(config.url))
        if config.client_cert:
            session.cert = (config.client_cert, config.client_key) if config.client_key else config.client_cert
        options = {"session": session}
        if "timeout" in inspect.signature(api.DICOMwebClient.__init__).parameters:
            options["timeout"] = config.timeout_s
        self._requests = requests
        self._session = session
        self.client = api.DICOMwebClient(config.url, **options)

    @contextlib.contextmanager
    def _answering(self, what: str):
        """Turn the HTTP layer's exceptions into one sentence: what failed, on which server, why."""
        exceptions = self._requests.exceptions
        try:
            yield
        except exceptions.SSLError:
            raise PacsError(f"cannot {what}: the TLS certificate of {self.describe()} is not trusted (give its CA "
                            "bundle as ca_bundle, VFS_PACS_CA_BUNDLE).") from None
        except (exceptions.ConnectionError, exceptions.Timeout):
            raise PacsError(f"cannot {what}: {self.describe()} does not answer (connection refused or timed out).") \
                from None
        except exceptions.HTTPError as error:
            status = getattr(error.response, "status_code", None)
            raise PacsError(f"cannot {what}: {self.describe()} answered HTTP {status} ({_reason(status)}).") from None
        except exceptions.RequestException as error:
            raise PacsError(f"cannot {what}: {self.describe()} failed ({type(error).__name__}).") from None
        except ValueError as error:  # a malformed answer (JSON, multipart)
            raise PacsError(f"cannot {what}: {self.describe()} sent an answer that is not DICOMweb ({error}).") from None

    def _json_headers(self, answers, keys) -> list[dict]:
        import pydicom

        return [plain_header(pydicom.Dataset.from_json(item), keys) for item in answers or []]

    def find_studies(self, query) -> list[dict]:
        with self._answering("search for studies"):
            answers = self.client.search_for_studies(fields=list(STUDY_KEYS), search_filters=query.filters(),
                                                     get_remaining=True)
        return sorted_studies(self._json_headers(answers, STUDY_KEYS))

    def find_series(self, study_uid: str) -> list[dict]:
        with self._answering(f"list the series of study {study_uid}"):
            answers = self.client.search_for_series(study_uid, fields=list(SERIES_KEYS), get_remaining=True)
        series = []
        for header in self._json_headers(answers, SERIES_KEYS):
            image = None
            if header.get("SeriesInstanceUID"):
                with self._answering(f"read an image header of series {header['SeriesInstanceUID']}"):
                    found = self.client.search_for_instances(study_uid, header["SeriesInstanceUID"],
                                                             fields=list(IMAGE_KEYS), limit=1)
                image = (self._json_headers(found, IMAGE_KEYS) or [None])[0]
            series.append(merged(header, image))
        return series

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        count = 0
        with self._answering(f"retrieve series {series_uid}"):
            for dataset in self.client.iter_series(study_uid, series_uid, media_types=AS_STORED):
                count += 1
                save_dataset(dataset, folder / f"{count:06d}.dcm")
        if count == 0:
            raise PacsError(f"{self.describe()} sent no instance of series {series_uid}.")
        return count

    def store(self, paths: list[Path], study_uid: str) -> int:
        import pydicom

        datasets = [pydicom.dcmread(str(p)) for p in paths]
        with self._answering(f"store the results of study {study_uid}"):
            answer = self.client.store_instances(datasets, study_instance_uid=study_uid)
        failed = list(getattr(answer, "FailedSOPSequence", None) or [])
        stored = len(list(getattr(answer, "ReferencedSOPSequence", None) or []))
        if failed:
            uids = {str(getattr(item, "ReferencedSOPInstanceUID", "")) for item in failed}
            names = [Path(p).name for p, ds in zip(paths, datasets) if str(ds.SOPInstanceUID) in uids]
            raise PacsError(f"{self.describe()} refused {len(failed)} of {len(paths)} result files "
                            f"({', '.join(names) or 'unnamed'}); {stored} stored.")
        return stored or len(paths)

    def stored_instances(self, study_uid: str) -> set[str]:
        with self._answering(f"list the instances of study {study_uid}"):
            answers = self.client.search_for_instances(study_uid, fields=["SOPInstanceUID"], get_remaining=True)
        return {str(h.get("SOPInstanceUID")) for h in self._json_headers(answers, ("SOPInstanceUID",))}

    def close(self) -> None:
        self._session.close()


def _reason(status) -> str:
    return {400: "bad request", 401: "the user name or password is wrong, or missing",
            403: "this user may not do that", 404: "no such path: check the DICOMweb URL",
            409: "the server refused the instances", 413: "the request is too large",
            415: "the server does not take this media type", 503: "the server is unavailable"}.get(
        status, "an error of the server" if status and status >= 500 else "refused")
