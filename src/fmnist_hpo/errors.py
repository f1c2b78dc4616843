"""Errors a user can cause. The CLI prints their message on one line and exits with their exit_code."""


class FmnistError(Exception):
    """Base class for expected, user-facing failures."""

    exit_code = 2  # a usage error, as click's own; one that stops a sweep short says otherwise


class ConfigError(FmnistError):
    """The experiment spec (file, overrides or search space) is invalid.

    Each problem has a source (the file, or the option that set the key); one problem reads as one
    line, several as a header line and one indented line per problem.
    """

    def __init__(self, problems: list[str], source: str = "config", sources: list[str] | None = None) -> None:
        self.problems = problems
        self.source = source
        self.sources = sources if sources is not None else [source] * len(problems)
        super().__init__(describe_problems(self.problems, self.sources, source))


def describe_problems(problems: list[str], sources: list[str], main_source: str) -> str:
    if len(problems) == 1:
        return f"{sources[0]}: {problems[0]}"
    distinct = sorted(dict.fromkeys(sources), key=lambda s: s != main_source)
    if len(distinct) == 1:
        return "\n".join([f"{distinct[0]}: {len(problems)} problems:", *(f"  {p}" for p in problems)])
    lines = [f"  {source}: {problem}" for source, problem in zip(sources, problems, strict=True)]
    return "\n".join([f"{' and '.join(distinct)}: {len(problems)} problems:", *lines])


class DataError(FmnistError):
    """The dataset files are missing, unreadable or inconsistent."""


class DeviceError(FmnistError):
    """The requested compute device is unknown or not available."""


class Terminated(BaseException):
    """SIGTERM, raised where the sweep is, so it unwinds like Ctrl-C (KeyboardInterrupt)."""


class OutputError(FmnistError):
    """A folder the sweep must write to (checkpoints, the store) cannot be created or written."""


class MachineFailure(FmnistError):
    """The machine failed the sweep, not the trial: a full disk, a read-only folder, a store locked or gone.

    The sweep stops as interrupted (its open runs KILLED where the store still takes writes) and
    `--resume` trains what it cut off; the search never learns from it. cause says what and where,
    fix what the user does before resuming.
    """

    exit_code = 75  # EX_TEMPFAIL, wherever it is raised: the same command works once the machine is fixed

    def __init__(self, cause: str, fix: str) -> None:
        self.cause, self.fix = cause, fix
        super().__init__(f"{cause}; {fix}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
