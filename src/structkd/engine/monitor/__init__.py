"""Callbacks that watch a distillation run: the start-up checks and the auto weight, the watch
of the distillation's share, hazards found before the run starts."""
