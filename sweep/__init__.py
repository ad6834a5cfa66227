"""xtuner-sweep: Optuna sweeps over XTuner fine-tuning with held-out validation and MLflow tracking."""
