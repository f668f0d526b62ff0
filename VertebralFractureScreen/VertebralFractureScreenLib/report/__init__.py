"""What the results say and how: the measurement registry (units, codes), the QC picture, agreement statistics."""
