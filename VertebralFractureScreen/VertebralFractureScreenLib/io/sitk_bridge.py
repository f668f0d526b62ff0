"""SimpleITK images to and from :class:`~.volume.Volume` objects.

ITK, SimpleITK, NRRD files written by Slicer and DICOM describe positions in LPS; a
:class:`~.volume.Volume` is in RAS. The conversion ``RAS = diag(-1, -1, 1) · LPS`` of SimpleITK
images happens here (:func:`sitk_ijk_to_ras`, :func:`lps_geometry`) and nowhere else, so the rest
of the library sees RAS only. SimpleITK's ``RuntimeError`` never escapes the readers, and ITK's own
warnings on stderr are silenced while they run (:func:`quiet_itk`): the problems they describe
are checked before and reported as one sentence.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..errors import InputError
from .volume import Volume


@contextlib.contextmanager
def quiet_itk():
    """Keep ITK's own warnings (printed on stderr by the C++ library) out of the user's console:
    the problems they describe are checked here and reported as one sentence."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def sitk_ijk_to_ras(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """IJK→RAS (mm) of a 3-D SimpleITK image (or of a reader's image information), whose origin
    and direction are in LPS."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)[None, :]
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return geometry.LPS_TO_RAS @ ijk_to_lps


def lps_geometry(ijk_to_ras: np.ndarray):
    """(spacing in mm, direction as row-major 9-tuple, origin in mm), all LPS, for SimpleITK."""
    ijk_to_lps = geometry.LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing[None, :]
    return tuple(spacing), tuple(direction.ravel()), tuple(ijk_to_lps[:3, 3])


def volume_from_sitk(image: sitk.Image) -> Volume:
    """Copy a 3-D scalar SimpleITK image (LPS geometry) into a :class:`Volume` (RAS geometry)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("volume_from_sitk needs a 3-D scalar image")
    return Volume(np.array(sitk.GetArrayViewFromImage(image)), sitk_ijk_to_ras(image))


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Copy a :class:`Volume` into a SimpleITK image with the equivalent LPS geometry.

    The grid's axes need not be orthogonal for SimpleITK itself, but NIfTI cannot store a sheared
    grid (see :func:`.images.write_volume`)."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, direction, origin = lps_geometry(volume.ijk_to_ras)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


class _ImageBuffer(np.ndarray):
    """A read-only NumPy view of a SimpleITK image's own buffer that keeps the image alive, so a
    volume already stored in the wanted type is not copied (a 512x512x1000 label map is 250 MB).
    Views and slices of it keep it alive through their ``base``."""

    _image = None


def buffer_of(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as a read-only ``[k, j, i]`` view of its own buffer (no copy); the
    view keeps the image alive."""
    view = sitk.GetArrayViewFromImage(image).view(_ImageBuffer)
    view._image = image
    view.flags.writeable = False
    return view


def component_bytes(pixel_id: int) -> int:
    """Bytes of one component of a SimpleITK pixel type (8 when unknown: the largest scalar)."""
    name = sitk.GetPixelIDValueAsString(pixel_id).lower()
    found = re.search(r"(\d+)-bit", name)
    if found:
        bits = int(found.group(1))
        return max(1, bits // 8) * (2 if "complex" in name else 1)
    return 8


def as_3d_scalar(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """Check that an image is 3-D and scalar (a 4-D image with one time point is reduced)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector or colour image);"
            " a scalar 3-D volume is needed"
        )
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension != 3:
        size = "x".join(str(n) for n in image.GetSize())
        raise InputError(f"{what} {path} is a {dimension}-D image ({size}); a 3-D volume is needed")
    return image
