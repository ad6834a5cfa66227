"""XTuner as the sweep uses it: configs loaded and rendered as literals, prompts and answers, tokens made once."""
