"""Seeded fuzzing of the readers (issue 26): NIfTI and NRRD headers, ``.seg.nrrd`` headers,
DICOM tags and model JSON, a few hundred mutations of small valid files made here.

Every outcome must be a volume (or model) with finite geometry, or :class:`InputError` (the
one sentence the command line prints with exit 2): never another exception, never text on
stderr (``capfd`` sees the C++ libraries' file descriptors too; Python warnings are left to the
command line, which prints them as ``warning:`` lines), and each within a time bound.
The counts of each outcome are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from collections import Counter

import numpy as np
import pytest

from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap, write_volume
from VertebralFractureScreenLib.io.seg_nrrd import write_segmentation_nrrd
from VertebralFractureScreenLib.io.volume import Volume
from VertebralFractureScreenLib.model.fracture_model import demo_model_path, load_model

from test_hostile_headers import AXIAL, matrix, small_ct, small_labels, write_dicom_series

SECONDS_PER_CASE = 10.0
SPECIAL_FLOATS = (float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 1e30, 3.4e38)


def _outcome(read, capfd, counts: Counter, case: str) -> None:
    """Run one reader call and count its outcome; anything but a result or one sentence, text on
    stderr or a slow call is counted under ``failed`` with its description."""
    capfd.readouterr()  # what making the case printed is not the reader's
    started = time.perf_counter()
    problems = []
    try:
        with warnings.catch_warnings():  # Python warnings are the command line's to print
            warnings.simplefilter("ignore")
            result = read()
    except InputError as error:
        message = str(error)
        if not message or "\n" in message.strip() or "Traceback" in message:
            problems.append(f"message {message!r}")
        outcome = "refused"
    except Exception as error:  # noqa: BLE001 - the very thing the fuzzing looks for
        problems.append(f"{type(error).__name__}: {error}")
    else:
        if isinstance(result, Volume) and not np.all(np.isfinite(result.ijk_to_ras)):
            problems.append("non-finite geometry")
        outcome = "read"
    if time.perf_counter() - started > SECONDS_PER_CASE:
        problems.append(f"took {time.perf_counter() - started:.1f} s")
    err = capfd.readouterr().err
    if err:
        problems.append(f"stderr {err[:200]!r}")
    if problems:
        outcome = "failed"
        FAILURES.append(f"{case}: {'; '.join(problems)}")
    counts[outcome] += 1


FAILURES: list = []


@pytest.fixture(autouse=True)
def _no_failures():
    FAILURES.clear()
    yield
    assert not FAILURES, "\n".join(FAILURES[:20])


def test_fuzz_nifti_headers(tmp_path, capfd):
    source = tmp_path / "ct.nii"
    write_volume(source, Volume(small_ct(), matrix()), compress=False)
    original = source.read_bytes()
    rng = random.Random(26)
    counts: Counter = Counter()
    for n in range(200):
        data = bytearray(original)
        if rng.random() < 0.5:  # a float field of the header set to a special value
            offset = rng.randrange(40, 344, 4)
            data[offset:offset + 4] = np.float32(rng.choice(SPECIAL_FLOATS)).tobytes()
        else:  # a few random bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, 348)] = rng.randrange(256)
        path = tmp_path / f"fuzz{n}.nii"
        path.write_bytes(bytes(data))
        _outcome(lambda: read_ct(path), capfd, counts, f"nifti {n}")
    print(f"\nNIfTI header mutations: {dict(counts)}")
    assert sum(counts.values()) == 200


NRRD_VALUES = ("nan", "inf", "0", "-3", "1e30", "1e-30", "99999999", "(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)",
               "raw", "gzip", "bzip2", "ascii", "short", "double", "LIST", "../x.raw", "/dev/zero", "", "(1,2)")


def _mutated_nrrd_header(text: bytes, rng: random.Random) -> bytes:
    header, _, data = text.partition(b"\n\n")
    lines = header.split(b"\n")
    index = rng.randrange(1, len(lines))
    key, _, _ = lines[index].partition(b":")
    value = rng.choice(NRRD_VALUES).encode()
    lines[index] = key + b": " + value if rng.random() < 0.8 else b"data file: " + value
    return b"\n".join(lines) + b"\n\n" + data


def test_fuzz_nrrd_headers(tmp_path, capfd):
    ct_source, seg_source = tmp_path / "ct.nrrd", tmp_path / "seg.seg.nrrd"
    write_volume(ct_source, Volume(small_ct(), matrix()), compress=False)
    write_segmentation_nrrd(seg_source, Volume(small_labels(), matrix()), {20: "vertebrae_L2", 19: "vertebrae_L1"})
    rng = random.Random(27)
    counts: Counter = Counter()
    for n in range(150):
        if n % 2 == 0:
            path = tmp_path / f"fuzz{n}.nrrd"
            path.write_bytes(_mutated_nrrd_header(ct_source.read_bytes(), rng))
            _outcome(lambda: read_ct(path), capfd, counts, f"nrrd {n}")
        else:
            path = tmp_path / f"fuzz{n}.seg.nrrd"
            path.write_bytes(_mutated_nrrd_header(seg_source.read_bytes(), rng))
            _outcome(lambda: read_labelmap(path), capfd, counts, f"seg.nrrd {n}")
    print(f"\nNRRD / .seg.nrrd header mutations: {dict(counts)}")
    assert sum(counts.values()) == 150


DICOM_VALUES = {
    "PixelSpacing": ([0.0, 1.0], ["nan", "1"], [-1.0, 1.0], [1e-30, 1e-30], [1.0]),
    "ImagePositionPatient": (["nan", "0", "0"], [0.0, 0.0], ["1e30", "0", "0"]),
    "ImageOrientationPatient": ([0.0] * 6, ["nan"] * 6, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0]),
    "Rows": (0, 1, 4, 65535),
    "Columns": (0, 3, 65535),
    "BitsAllocated": (1, 8, 32),
    "RescaleSlope": ("nan", 0, -1, "1e30"),
    "RescaleIntercept": ("nan", "inf"),
    "SliceThickness": (0, -2, "nan"),
}


def test_fuzz_dicom_tags(tmp_path, capfd):
    pydicom = pytest.importorskip("pydicom")
    rng = random.Random(28)
    counts: Counter = Counter()
    for n in range(40):
        folder = tmp_path / f"series{n}"
        write_dicom_series(folder, [AXIAL] * 4)
        files = sorted(folder.iterdir())
        for _ in range(rng.randint(1, 2)):
            target = rng.choice(files) if rng.random() < 0.5 else None
            tag = rng.choice(sorted(DICOM_VALUES))
            value = rng.choice(DICOM_VALUES[tag])
            for path in ([target] if target else files):
                ds = pydicom.dcmread(path)
                try:
                    with warnings.catch_warnings():  # pydicom warns of the invalid values wanted here
                        warnings.simplefilter("ignore")
                        setattr(ds, tag, value)
                        ds.save_as(path, enforce_file_format=True)
                except (ValueError, TypeError, OverflowError):
                    pass  # pydicom itself refuses to write that value
        _outcome(lambda: read_ct(folder), capfd, counts, f"dicom {n}")
    print(f"\nDICOM tag mutations: {dict(counts)}")
    assert sum(counts.values()) == 40


MODEL_VALUES = (float("nan"), float("inf"), 1e400, -1, 0, 10**400, "x", "0.5", None, True, [], {}, [[[[[[]]]]]],
                list(range(1000)))


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list) and node and not all(isinstance(v, (int, float)) for v in node):
        for index, value in enumerate(node):
            yield from _leaves(value, path + (index,))
    else:
        yield path


def test_fuzz_model_json(tmp_path, capfd):
    original = json.loads(demo_model_path().read_text())
    places = list(_leaves(original))
    rng = random.Random(29)
    counts: Counter = Counter()
    for n in range(200):
        model = copy.deepcopy(original)
        for _ in range(rng.randint(1, 3)):
            place = rng.choice(places)
            parent = model
            try:
                for key in place[:-1]:
                    parent = parent[key]
                if rng.random() < 0.2 and isinstance(parent, dict):
                    parent.pop(place[-1], None)
                else:
                    value = rng.choice(MODEL_VALUES)
                    if isinstance(parent[place[-1]], list) and parent[place[-1]] and rng.random() < 0.5:
                        parent[place[-1]][rng.randrange(len(parent[place[-1]]))] = value
                    else:
                        parent[place[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation removed the place
        path = tmp_path / f"model{n}.json"
        try:
            text = json.dumps(model, allow_nan=True)
        except (ValueError, OverflowError):
            text = json.dumps(model, allow_nan=True, default=str)
        path.write_text(text)
        _outcome(lambda: load_model(path), capfd, counts, f"model {n}")
    print(f"\nmodel JSON mutations: {dict(counts)}")
    assert sum(counts.values()) == 200
