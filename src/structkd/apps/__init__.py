"""Users of the Python API: the demo, the seed study, their plots, pictures and latency tables."""
