"""Segmentation by TotalSegmentator: in process, in a child process (Slicer), and its one-step install."""
