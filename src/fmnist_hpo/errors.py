"""Errors a user can cause. The CLI prints their message on one line and exits 2."""


class FmnistError(Exception):
    """Base class for expected, user-facing failures."""


class ConfigError(FmnistError):
    """The experiment spec (file, overrides or search space) is invalid."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__("; ".join(f"{source}: {p}" for p in problems))


class DataError(FmnistError):
    """The dataset files are missing, unreadable or inconsistent."""


class DeviceError(FmnistError):
    """The requested compute device is unknown or not available."""


class Terminated(BaseException):
    """SIGTERM, raised where the sweep is, so it unwinds like Ctrl-C (KeyboardInterrupt)."""
