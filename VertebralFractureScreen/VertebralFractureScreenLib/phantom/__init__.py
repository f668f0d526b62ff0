"""The synthetic spine CT with exact ground truth, for tests, benchmarks and the demo."""
