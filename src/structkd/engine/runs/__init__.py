"""Run folders and what makes a run the same run: folders and their locks, resume identity and
random states, results read back."""
