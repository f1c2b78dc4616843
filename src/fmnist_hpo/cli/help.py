"""Conventional metavars in `fmnist <command> --help`: `SPEC...`, `MODEL [IMAGE]...`, `--max-evals INTEGER`.

Typer 0.29 (the floor in pyproject.toml) shows Python types instead (`<list[Path]>`, `--help <bool>`) and braces around required
arguments (`{model}`); this command class puts back what click and GNU tools print.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

TYPE_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "Path": "PATH"}


def _type_name(param: Any) -> str:
    annotation = param.type_descriptor.annotation
    return getattr(annotation, "__name__", str(annotation))


def _argument_name(argument: TyperArgument) -> str:
    name = argument.metavar or argument.name.upper()
    return name if argument.nargs == 1 or name.endswith("...") else f"{name}..."


def _flag_help_option(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # a flag takes no value
    return option


class ConventionalGroup(TyperGroup):
    """`fmnist --help` with the same `--help` line as its commands'."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help_option(super().get_help_option(ctx))


class ConventionalHelp(TyperCommand):
    """A command whose usage line and help panels show NAME, [NAME]... and TYPE metavars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.metavar = _argument_name(param)
                param.display_type_rich = lambda ctx: None  # the name already says what it takes
            elif isinstance(param, TyperOption) and param.metavar is None and hasattr(param, "type_descriptor"):
                param.metavar = "" if param.is_flag else TYPE_METAVARS.get(_type_name(param), "TEXT")

    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help_option(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else _optional(param.metavar))
        return pieces


def _optional(name: str) -> str:
    return f"[{name.removesuffix('...')}]..." if name.endswith("...") else f"[{name}]"
