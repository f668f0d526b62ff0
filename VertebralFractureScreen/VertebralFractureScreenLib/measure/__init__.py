"""Measurements: pure functions from arrays and an IJK→RAS matrix to small typed results (heights, grades, trabecular HU, muscles). No file I/O."""
