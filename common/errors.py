"""Bad input from the user: one exception type, printed as one line by the command-line entry (common.cli)."""


class UsageError(Exception):
    """Bad input from the user (a value that is not allowed, a missing path). Printed as one line, exit code 2."""


def check_choice(what: str, value, allowed) -> None:
    """Raise a UsageError naming `value` and the allowed values unless `value` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
