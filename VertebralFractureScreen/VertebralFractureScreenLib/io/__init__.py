"""Reading and writing CT volumes, label maps and 3D Slicer segmentations.

One concern a module; each imports only the modules listed before it, so there are no cycles:

* :mod:`.files`: file rules shared by every format, without SimpleITK: the declared-size limit,
  reading in bounded chunks, image file-name suffixes, atomic writes.
* :mod:`.labels`: label conventions, SNOMED CT terminology and the one segment-matching rule
  (no SimpleITK).
* :mod:`.volume`: :class:`~.volume.Volume` (voxel array ``[k, j, i]`` and IJK→RAS in mm), the
  voxel-size and grid checks, and the voxel types of CT and label arrays (no SimpleITK).
* :mod:`.sitk_bridge`: SimpleITK images to and from volumes; the only place where LPS becomes RAS
  for SimpleITK images.
* :mod:`.nifti`: NIfTI header checks and the direct NIfTI reader.
* :mod:`.nrrd`: NRRD headers, the detached-data rule (NRRD and MetaImage), the NRRD voxel reader.
* :mod:`.seg_nrrd`: 3D Slicer segmentation files (``.seg.nrrd``), read and written.
* :mod:`.dicom`: DICOM series: detection, reading, the slice orientation and position checks.
* :mod:`.images`: :func:`~.images.read_ct`, :func:`~.images.read_labelmap`,
  :func:`~.images.resample_labelmap`, :func:`~.images.write_volume`: the entry points.

The package imports nothing itself, so ``io.files`` and ``io.labels`` load without SimpleITK.
"""
