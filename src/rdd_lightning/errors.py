"""Errors raised for bad user input; entry points print them as one line and exit non-zero."""


class ConfigError(ValueError):
    """A config value, file or dataset that cannot be used. The message names the key, the value and the fix."""
