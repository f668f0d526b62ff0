"""VertebralFractureScreen library: opportunistic vertebral fracture screening on CT.

Plain Python (numpy / scipy / SimpleITK), no Qt: it runs headless, under test, and inside
3D Slicer, whose thin module file (``VertebralFractureScreen.py``) only wires the panel to it.

Conventions (see SPEC §3): image arrays are indexed ``[k, j, i]`` (slice, row, column) as
Slicer's ``arrayFromVolume`` gives them; geometry is a 4x4 IJK→RAS matrix in millimetres.
"""

__version__ = "0.1.0"
