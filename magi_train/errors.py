"""One-line configuration errors that name the field and what it accepts."""


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the accepted values."""


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def check_choice(value, field: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{field}: got {value!r}, accepted values are {', '.join(repr(c) for c in choices)}")
