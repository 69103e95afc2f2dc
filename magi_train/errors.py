"""One-line configuration errors that name the field and what it accepts."""


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the accepted values."""


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def check_choice(value, field: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{field}: got {value!r}, accepted values are {', '.join(repr(c) for c in choices)}")


class RunStopped(RuntimeError):
    """A fault that ends a run with one line and a non-zero exit code instead of a traceback or a hang
    (magi_train/training/run_errors.py lists the codes); the message is the one line the user sees."""

    exit_code = 1
