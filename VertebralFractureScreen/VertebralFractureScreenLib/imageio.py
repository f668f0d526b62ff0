"""Temporary: re-exports the io package's names until the callers import from io directly.

Reading and writing images lives in the :mod:`.io` package, one concern a module; these are the
names that modules not yet moved over still import from here.
"""

from .io.dicom import is_dicom_folder
from .io.files import IMAGE_SUFFIXES, atomic_write, atomic_write_text, split_image_suffix
from .io.images import read_ct, read_labelmap, resample_labelmap, write_volume
from .io.labels import LabelMapWarning
from .io.volume import MAX_VOXEL_SIZE_MM, MIN_VOXEL_SIZE_MM, Volume, plausible_voxel_sizes

__all__ = [
    "IMAGE_SUFFIXES",
    "LabelMapWarning",
    "MAX_VOXEL_SIZE_MM",
    "MIN_VOXEL_SIZE_MM",
    "Volume",
    "atomic_write",
    "atomic_write_text",
    "is_dicom_folder",
    "plausible_voxel_sizes",
    "read_ct",
    "read_labelmap",
    "resample_labelmap",
    "split_image_suffix",
    "write_volume",
]
