"""Reading and writing CT volumes and label maps: the entry points of the io package.

Everything here returns or takes a :class:`~.volume.Volume`: a voxel array indexed ``[k, j, i]``
and a 4x4 IJK→RAS matrix in millimetres. Files in LPS (ITK, SimpleITK, Slicer's NRRD, DICOM) are
converted to RAS by :mod:`.sitk_bridge` and :mod:`.nrrd`, so the rest of the library sees RAS only.

Inputs:

* CT: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``),
  or a DICOM series (a folder, or one file of the series). Values are Hounsfield units: DICOM
  rescale slope/intercept and NIfTI ``scl_slope``/``scl_inter`` are applied by SimpleITK.
* Label maps: the same image formats, or a 3D Slicer segmentation (``.seg.nrrd``) whose segments
  are mapped to a label convention by segment ID, then by terminology (never by display name
  alone; :mod:`.seg_nrrd`). Label maps given with a reference CT are resampled onto the CT's grid
  by nearest neighbour in physical space.

Every problem with the user's input raises :class:`~.errors.InputError` with one sentence that
names the file; SimpleITK's ``RuntimeError`` never escapes. Problems that do not stop reading
(segments that cannot be mapped, overlapping segments) are reported with
:class:`~.labels.LabelMapWarning` through the standard :mod:`warnings` module, so callers can
collect them with ``warnings.catch_warnings(record=True)``.

Headers are checked before any voxel is read, because ITK silently repairs some broken headers
and prints others' problems on stderr: the rules of each format are in :mod:`.nifti`,
:mod:`.nrrd` and :mod:`.dicom`, the declared-size limit in :mod:`.files`, and the voxel-size and
grid rules that every format's final geometry meets in :mod:`.volume`. Refused here: an image that
is not a 3-D scalar volume, and a CT with a single slice.

:func:`write_volume` is atomic (:func:`~.files.atomic_write`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..errors import InputError
from .dicom import has_dicom_preamble, read_dicom_series
from .files import atomic_write, check_declared_size, file_extension, itk_reason, require_file
from .labels import convention_ids
from .nifti import check_nifti, read_nifti_directly
from .nrrd import check_detached_data
from .seg_nrrd import is_segmentation_nrrd, read_segmentation_nrrd
from .sitk_bridge import as_3d_scalar, buffer_of, component_bytes, lps_geometry, quiet_itk, sitk_ijk_to_ras, volume_to_sitk
from .volume import SLAB_VOXELS, Volume, check_grid, ct_array, label_array

_WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _read_image_file(path: Path, what: str) -> sitk.Image:
    """Read a single image file with SimpleITK, turning every failure into an InputError.

    The header is checked first (NIfTI fields, NRRD and MetaImage data files, the declared size),
    so ITK never allocates a huge volume or follows a data file out of the header's folder."""
    check_nifti(path, what)
    check_detached_data(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
            size = reader.GetSize()
            components = max(1, reader.GetNumberOfComponents())
            check_declared_size(path, what, (*size, components), component_bytes(reader.GetPixelID()))
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read {what} file {path}: {itk_reason(error)}") from None
    return image


def _check_single_slice(shape_kji, path: Path) -> None:
    if min(shape_kji) < 2:
        size = "x".join(str(n) for n in shape_kji[::-1])
        raise InputError(f"CT {path} has a single slice ({size}); a 3-D volume is needed")


# ------------------------------------------------------------------------------------------------
# CT
# ------------------------------------------------------------------------------------------------


def read_ct(path, series_uid: str | None = None) -> Volume:
    """Read a CT volume in Hounsfield units.

    Args:
        path: a NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``) or MetaImage
            (``.mha``/``.mhd``) file, a folder holding a DICOM series, or one file of a DICOM
            series (the whole series it belongs to is read).
        series_uid: SeriesInstanceUID to read when the DICOM folder holds several series.

    Returns:
        A :class:`Volume` with HU values (rescale slope/intercept applied) as ``int16`` when they
        are whole numbers within the ``int16`` range, otherwise ``float32``; geometry as IJK→RAS
        in mm.

    Raises:
        InputError: missing, unreadable or corrupt input; an image that is not a 3-D scalar volume
            or has a single slice; a DICOM folder with no series, or with several and no
            ``series_uid``; DICOM slices that are unevenly spaced, duplicated or gantry-tilted.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"CT file not found: {path}")
    if path.is_dir():
        image = read_dicom_series(path, series_uid)
    elif not path.is_file():
        raise InputError(f"CT path {path} is not a regular file (a device, pipe or socket)")
    elif has_dicom_preamble(path) or path.suffix.lower() == ".dcm":
        image = read_dicom_series(path.parent, series_uid, member=path)
    else:
        direct = read_nifti_directly(path, "CT")
        if direct is not None:
            array, ijk_to_ras = direct
            _check_single_slice(array.shape, path)
            return Volume(ct_array(array, reuse=True), check_grid(ijk_to_ras, path, "CT"))
        image = _read_image_file(path, "CT")
    image = as_3d_scalar(image, path, "CT")
    _check_single_slice(sitk.GetArrayViewFromImage(image).shape, path)
    ijk_to_ras = check_grid(sitk_ijk_to_ras(image), path, "CT")
    array = ct_array(buffer_of(image), reuse=True)
    del image
    return Volume(array, ijk_to_ras)


# ------------------------------------------------------------------------------------------------
# Label maps
# ------------------------------------------------------------------------------------------------


def read_labelmap(path, reference: Volume | None = None, convention: str = "totalsegmentator") -> Volume:
    """Read a label map, optionally resampled onto a reference grid.

    Args:
        path: a NIfTI, NRRD or MetaImage label map (voxel values are used as they are), or a 3D
            Slicer segmentation (``.seg.nrrd``/``.seg.nhdr``, or any ``.nrrd`` with
            ``Segment0_ID`` in its header), 3-D (one layer) or 4-D (several layers).
        reference: when given and its grid differs, the label map is resampled onto it by
            nearest neighbour in physical (RAS) space; see :func:`resample_labelmap`.
        convention: label ids that Slicer segments are mapped to: ``totalsegmentator`` (``total``
            task ids), ``verse`` (VerSe ids, vertebrae only) or ``vertebrae_body`` (1 = bodies,
            2 = discs). Plain label-map files are not remapped.

    Slicer segments are matched by segment ID equal to a TotalSegmentator class name (e.g.
    ``vertebrae_L1``); failing that, by their terminology (SNOMED CT code of the segmented
    property type, with its left/right modifier, or a type meaning such as ``L1 vertebra``). The
    segment name is never used on its own, and a segment whose name names a different structure
    than its terminology is dropped. Unmatched segments are dropped with a
    :class:`~.labels.LabelMapWarning`.
    Where segments of different layers overlap, the segment of the higher layer wins (also
    reported with a warning).

    Returns:
        A :class:`Volume` of integer label ids (``uint8`` when the largest id is below 256, else
        ``uint16`` or ``int32``), IJK→RAS in mm.

    Raises:
        InputError: missing or unreadable file, not a 3-D scalar image, non-integer or negative
            values, unknown convention, or a label map that does not overlap the reference.
    """
    known = convention_ids(convention)
    path = require_file(path, "segmentation")
    if is_segmentation_nrrd(path):
        labelmap = read_segmentation_nrrd(path, known, convention)
    else:
        direct = read_nifti_directly(path, "segmentation")
        if direct is not None:
            ijk_to_ras = check_grid(direct[1], path, "segmentation")
            labelmap = Volume(label_array(direct[0], path, reuse=True), ijk_to_ras)
        else:
            image = as_3d_scalar(_read_image_file(path, "segmentation"), path, "segmentation")
            ijk_to_ras = check_grid(sitk_ijk_to_ras(image), path, "segmentation")
            labelmap = Volume(label_array(buffer_of(image), path, reuse=True), ijk_to_ras)
    if reference is not None:
        labelmap = resample_labelmap(labelmap, reference, name=f"segmentation {path}")
    return labelmap


def resample_labelmap(labelmap: Volume, reference: Volume, name: str = "segmentation") -> Volume:
    """Resample a label map onto ``reference``'s grid by nearest neighbour in physical space.

    For each reference voxel centre (RAS, mm) the label voxel whose centre is nearest along each
    of the label grid's axes is taken (continuous label index rounded half up); reference voxels
    outside the label grid get 0. Exact with respect to both 4x4 matrices, whatever their
    orientations (RAS, LPS, permuted, oblique). When the label grid equals the reference grid up
    to axis flips, permutations and whole-voxel shifts, the labels are copied by array indexing
    (:func:`resample_by_indexing`); otherwise SimpleITK's nearest-neighbour resampler runs slab by
    slab of the reference (:func:`resample_by_sitk`).

    Raises:
        InputError: the label map has labels but none lands inside the reference grid (different
            patient or wrong file).
    """
    if labelmap.same_grid(reference, tol=1e-4):  # 1e-4 mm: nearest neighbour is the identity
        return Volume(labelmap.array, reference.ijk_to_ras)
    not_overlapping = InputError(f"{name} does not overlap the CT (different patient or wrong file?)")
    low_a, high_a = _bounds(labelmap)
    low_b, high_b = _bounds(reference)
    if np.any(high_a < low_b) or np.any(high_b < low_a):
        raise not_overlapping
    out = resample_by_indexing(labelmap, reference)
    if out is None:
        out = resample_by_sitk(labelmap, reference)
    if not out.any() and labelmap.array.any():
        raise not_overlapping
    return Volume(out, reference.ijk_to_ras)


def _bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = geometry.grid_corners_ras(volume.ijk_to_ras, volume.shape)
    return corners.min(axis=0), corners.max(axis=0)


def resample_by_indexing(labelmap: Volume, reference: Volume) -> np.ndarray | None:
    """Labels on ``reference``'s grid (``[k, j, i]``, 0 outside the label grid), copied when
    reference voxel centres fall exactly on label voxel centres by a signed axis permutation plus
    a whole-voxel shift; None when the grids are not related that way. The fast path of
    :func:`resample_labelmap`."""
    ref_to_label = np.linalg.inv(labelmap.ijk_to_ras) @ reference.ijk_to_ras
    linear, shift = ref_to_label[:3, :3], ref_to_label[:3, 3]
    permutation = np.rint(linear)
    if not (np.all(np.abs(permutation).sum(axis=0) == 1) and np.all(np.abs(permutation).sum(axis=1) == 1)):
        return None
    error = np.abs(linear - permutation).max() * max(reference.shape) + np.abs(shift - np.rint(shift)).max()
    if error > 1e-3:
        return None
    shift = np.rint(shift).astype(int)
    n_ref = reference.shape[::-1]  # sizes along i, j, k
    n_lab = labelmap.shape[::-1]
    out = np.zeros(reference.shape, dtype=labelmap.array.dtype)
    ref_slices, lab_slices, lab_axes = [None] * 3, [None] * 3, [None] * 3
    for a in range(3):  # reference ijk axis
        b = int(np.argmax(np.abs(permutation[:, a])))  # label ijk axis it runs along
        sign, t = int(permutation[b, a]), int(shift[b])
        if sign > 0:  # label index = r + t
            r0, r1 = max(0, -t), min(n_ref[a], n_lab[b] - t)
            lab = slice(r0 + t, r1 + t)
        else:  # label index = t - r
            r0, r1 = max(0, t - n_lab[b] + 1), min(n_ref[a], t + 1)
            stop = t - r1
            lab = slice(t - r0, stop if stop >= 0 else None, -1)
        if r0 >= r1:
            return out
        ref_slices[2 - a], lab_slices[2 - a], lab_axes[2 - a] = slice(r0, r1), lab, 2 - b
    aligned = labelmap.array.transpose(lab_axes)
    out[tuple(ref_slices)] = aligned[tuple(lab_slices)]
    return out


def resample_by_sitk(labelmap: Volume, reference: Volume) -> np.ndarray:
    """Labels on ``reference``'s grid (``[k, j, i]``, 0 outside the label grid) by SimpleITK's
    nearest-neighbour resampler, :data:`~.volume.SLAB_VOXELS` voxels of reference slices at a time:
    the general path of :func:`resample_labelmap`."""
    source = volume_to_sitk(labelmap)
    spacing, direction, _ = lps_geometry(reference.ijk_to_ras)
    ijk_to_lps = geometry.LPS_TO_RAS @ reference.ijk_to_ras
    nk, nj, ni = reference.shape
    out = np.zeros(reference.shape, dtype=labelmap.array.dtype)
    slab = max(1, SLAB_VOXELS // (ni * nj))
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        origin = ijk_to_lps[:3, :3] @ np.array([0.0, 0.0, k0]) + ijk_to_lps[:3, 3]
        with quiet_itk():
            resampled = sitk.Resample(
                source,
                [ni, nj, k1 - k0],
                sitk.Transform(),
                sitk.sitkNearestNeighbor,
                tuple(origin),
                spacing,
                direction,
                0,
                source.GetPixelID(),
            )
        out[k0:k1] = sitk.GetArrayViewFromImage(resampled)
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_volume(path, volume: Volume, compress: bool = True) -> None:
    """Write a volume as NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``) or MetaImage (``.mha``),
    chosen by the file name, atomically.

    The RAS geometry is stored as the files expect it: SimpleITK writes LPS origin and direction,
    which NIfTI's writer turns into RAS qform and sform (both code 1, scanner). NIfTI stores the
    matrix in single precision (about 1e-5 mm at 500 mm from the origin); NRRD and MetaImage in
    double precision. NIfTI cannot store a sheared grid: such a volume raises :class:`InputError`
    unless written as NRRD or MetaImage. ``compress`` gzips the voxel data of NRRD and MetaImage
    files; NIfTI compression follows the name (``.nii.gz`` compressed, ``.nii`` not).
    """
    path = Path(path).expanduser()
    extension = file_extension(path, _WRITE_EXTENSIONS)
    if extension.startswith(".nii"):
        directions = geometry.direction_cosines(volume.ijk_to_ras)
        if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
            raise InputError(f"cannot write {path}: NIfTI cannot store a sheared voxel grid; use .nrrd")
    image = volume_to_sitk(volume)

    def write(temporary: str) -> None:
        with quiet_itk():
            sitk.WriteImage(image, temporary, bool(compress))

    atomic_write(path, extension, write)
