"""MLflow: runs and metrics, the test-set gate, scoring, the champion as a pyfunc model, export."""
