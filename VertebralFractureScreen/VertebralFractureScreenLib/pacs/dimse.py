"""DIMSE: C-FIND to find, C-GET to copy a series, C-STORE to store results (``pynetdicom``).

Every operation is one association from ``calling_aet`` to ``called_aet`` at ``host``:``port``
(Study Root query/retrieve). C-GET rather than C-MOVE: the images come back on the same
association, so the PACS needs no route back to this machine (no listening port, no firewall
rule); the PACS must allow C-GET from this AE title (Orthanc: ``DicomModalities`` entry with
``AllowGet``, or ``DicomAlwaysAllowGet``). Images are accepted in every transfer syntax of
:data:`RETRIEVE_SYNTAXES`, each offered in its own presentation context, so a compressed archive
is copied as stored.

TLS (``tls = true``): the association runs over TLS with pynetdicom's ``tls_args``, verified
against ``ca_bundle`` and presenting ``client_cert``/``client_key`` when given (Orthanc:
``DicomTlsEnabled``). DIMSE has no passwords: the PACS knows the client by AE title and address.
"""

from __future__ import annotations

from pathlib import Path

from .config import PacsConfig, PacsError
from .connection import (IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, PacsConnection, merged, plain_header, require,
                         sorted_studies)

RETRIEVE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                     "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80",
                     "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.2")
"""Transfer syntaxes accepted for retrieved images: explicit and implicit little endian, JPEG 2000
(lossless, lossy), JPEG lossless (SV1, process 14), JPEG-LS (lossless, near-lossless), RLE, deflated,
JPEG baseline, explicit big endian."""
RETRIEVED_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
"""SOP classes accepted for retrieved images: CT Image Storage and Enhanced CT Image Storage."""
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)
STORE_WARNINGS = (0xB000, 0xB006, 0xB007)
"""C-STORE statuses that mean stored (coercion of data elements, elements discarded)."""


class DimseConnection(PacsConnection):
    """A DIMSE peer (module docstring)."""

    def __init__(self, config: PacsConfig):
        super().__init__(config)
        require("pydicom", "pydicom")
        self._net = require("pynetdicom", "pynetdicom")

    def _application_entity(self):
        ae = self._net.AE(ae_title=self.config.calling_aet)
        for attribute in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            if hasattr(ae, attribute):
                setattr(ae, attribute, self.config.timeout_s)
        return ae

    def _tls(self):
        if not self.config.tls:
            return None
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.config.ca_bundle)
        if self.config.client_cert:
            context.load_cert_chain(self.config.client_cert, self.config.client_key)
        return context, self.config.host

    def _associate(self, ae, what: str, **options):
        """An established association, or PacsError: refused connection vs rejected association."""
        try:
            association = ae.associate(self.config.host, self.config.port, ae_title=self.config.called_aet,
                                       tls_args=self._tls(), **options)
        except OSError as error:
            raise PacsError(f"cannot {what}: the TLS setup failed ({error.strerror or error}).") from None
        if association.is_established:
            return association
        if association.is_rejected:
            raise PacsError(f"cannot {what}: {self.describe()} rejected the association (is {self.config.called_aet} "
                            f"its AE title, and does it know this client's AE title {self.config.calling_aet}?).")
        if self.config.tls:  # pynetdicom aborts quietly when the server's certificate fails verification
            raise PacsError(f"cannot {what}: {self.describe()} does not answer over TLS (connection refused, or its "
                            "certificate is not trusted: give its CA bundle as ca_bundle, VFS_PACS_CA_BUNDLE).")
        raise PacsError(f"cannot {what}: {self.describe()} does not answer (connection refused, timed out or "
                        "aborted).")

    def _find(self, level: str, keys, filters: dict, what: str) -> list[dict]:
        """C-FIND answers at ``level`` with ``keys`` returned and ``filters`` matched."""
        from pydicom.dataset import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for key in keys:
            setattr(identifier, key, filters.get(key, ""))
        for key, value in filters.items():
            setattr(identifier, key, value)
        ae = self._application_entity()
        ae.add_requested_context(STUDY_ROOT_FIND)
        association = self._associate(ae, what)
        answers, status = [], None
        try:
            for status, found in association.send_c_find(identifier, STUDY_ROOT_FIND):
                if status is not None and status.Status in PENDING and found is not None:
                    answers.append(plain_header(found, keys))
        finally:
            association.release()
        _check_status(status, what, self.describe())
        return answers

    def find_studies(self, query) -> list[dict]:
        return sorted_studies(self._find("STUDY", STUDY_KEYS, query.filters(), "search for studies"))

    def find_series(self, study_uid: str) -> list[dict]:
        what = f"list the series of study {study_uid}"
        series = self._find("SERIES", SERIES_KEYS, {"StudyInstanceUID": study_uid}, what)
        images = self._find("IMAGE", ("SeriesInstanceUID",) + IMAGE_KEYS, {"StudyInstanceUID": study_uid}, what)
        first: dict[str, dict] = {}
        for image in images:
            first.setdefault(str(image.get("SeriesInstanceUID")), image)
        return [merged(header, first.get(str(header.get("SeriesInstanceUID")))) for header in series]

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int:
        from pydicom.dataset import Dataset

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ae = self._application_entity()
        ae.add_requested_context(STUDY_ROOT_GET)
        for sop_class in RETRIEVED_CLASSES:
            for syntax in RETRIEVE_SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
        received = []

        def on_store(event):
            received.append(folder / f"{len(received) + 1:06d}.dcm")
            if hasattr(event, "encoded_dataset"):  # pynetdicom >= 2.1: the bytes as sent
                received[-1].write_bytes(event.encoded_dataset())
            else:  # pynetdicom 2.0 (the newest for Python 3.9): the decoded dataset, in its transfer syntax
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                dataset.save_as(str(received[-1]), write_like_original=False)
            return SUCCESS

        roles = [self._net.build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_CLASSES]
        what = f"retrieve series {series_uid}"
        association = self._associate(ae, what, ext_neg=roles, evt_handlers=[(self._net.evt.EVT_C_STORE, on_store)])
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "SERIES", study_uid
        identifier.SeriesInstanceUID = series_uid
        status, last = None, None
        try:
            for status, last in association.send_c_get(identifier, STUDY_ROOT_GET):
                pass
        finally:
            association.release()
        failed = int(getattr(last, "NumberOfFailedSuboperations", 0) or 0) if last is not None else 0
        if status is not None and status.Status != SUCCESS and received and failed:
            raise PacsError(f"cannot {what}: {failed} of its images did not arrive (are they CT images?).")
        _check_status(status, what, self.describe())
        if not received:
            raise PacsError(f"{self.describe()} sent no instance of series {series_uid}.")
        return len(received)

    def store(self, paths: list[Path], study_uid: str) -> int:
        import pydicom

        datasets = [pydicom.dcmread(str(p)) for p in paths]
        ae = self._application_entity()
        for dataset in datasets:
            ae.add_requested_context(str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
        what = f"store the results of study {study_uid}"
        association = self._associate(ae, what)
        refused = []
        try:
            for index, (path, dataset) in enumerate(zip(paths, datasets)):
                status = association.send_c_store(dataset)
                code = getattr(status, "Status", None)
                if code is None or (code != SUCCESS and code not in STORE_WARNINGS):
                    refused.append(f"{Path(path).name}: {'no answer' if code is None else f'status 0x{code:04X}'}")
                if not association.is_established:
                    refused.extend(f"{Path(p).name}: not sent" for p in paths[index + 1:])
                    break
        finally:
            if association.is_established:
                association.release()
        if refused:
            raise PacsError(f"{self.describe()} refused {len(refused)} of {len(paths)} result files "
                            f"({'; '.join(refused)}); {len(paths) - len(refused)} stored.")
        return len(paths)

    def stored_instances(self, study_uid: str) -> set[str]:
        found = self._find("IMAGE", ("SOPInstanceUID",), {"StudyInstanceUID": study_uid},
                           f"list the instances of study {study_uid}")
        return {str(h.get("SOPInstanceUID")) for h in found}


def _check_status(status, what: str, server: str) -> None:
    """A final C-FIND/C-GET status that is not success is one sentence (no status: the association
    ended early)."""
    if status is None or "Status" not in status:
        raise PacsError(f"cannot {what}: {server} ended the association without an answer.")
    if status.Status != SUCCESS:
        raise PacsError(f"cannot {what}: {server} answered status 0x{status.Status:04X}.")
