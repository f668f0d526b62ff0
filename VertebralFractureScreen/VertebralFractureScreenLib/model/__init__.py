"""The fracture model: exam features, the model file, training, metrics and reports."""
