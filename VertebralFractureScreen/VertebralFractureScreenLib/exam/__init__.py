"""One exam end to end: screening from inputs to the written results."""
