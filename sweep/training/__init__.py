"""Code that runs only inside XTuner's training process: the worker, the hook and its metrics, the patches."""
