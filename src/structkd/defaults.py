"""Defaults that several rooms name, each written once (this module imports nothing, so the CLI
can show them without loading torch)."""

__all__ = ["DEFAULT_METHOD"]

# The method structkd distils with when none is named (the paper it is built around).
DEFAULT_METHOD = "ssim"
