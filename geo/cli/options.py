"""Options shared by several commands, generated once from the library's own definitions.

``fit_options`` turns every field of ``geo.training.config.FitConfig`` into a
click option (name, default, type and help come from the field), so ``geo
fit-head`` and ``geo sweep`` cannot drift from the library's defaults. A sweep
takes comma lists for the options it varies (``--head``, ``--n-cells``,
``--kappa0``, ``--lr``) and generates the rest the same way.
"""

from __future__ import annotations

import dataclasses
import typing

import click

from geo.training.config import FitConfig, fit_config_fields


def option_name(field: dataclasses.Field) -> str:
    """``n_cells`` -> ``--n-cells``."""
    return "--" + field.name.replace("_", "-")


def _click_type(field: dataclasses.Field):
    if "choices" in field.metadata:
        return click.Choice(list(field.metadata["choices"]))
    hints = typing.get_type_hints(FitConfig)
    kind = hints[field.name]
    return next((t for t in (bool, int, float, str) if kind is t or t in typing.get_args(kind)), str)


def _fit_option(field: dataclasses.Field, aliases: tuple[str, ...] = ()):
    meta = field.metadata
    if "flag" in meta:  # "--train-mu/--fixed-mu"
        return click.option(meta["flag"], field.name, default=field.default, show_default=True, help=meta["help"])
    return click.option(option_name(field), *aliases, field.name, default=field.default, type=_click_type(field),
                        show_default=field.default is not None, help=meta["help"])


# Earlier spellings still accepted (scripts written against geo 0.1): --classes for --n-cells.
_ALIASES = {"n_cells": ("--classes",)}


def fit_options(*, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per ``FitConfig`` field (except ``skip``), in field order."""

    def decorate(command):
        for field in reversed(fit_config_fields()):
            if field.name not in skip:
                command = _fit_option(field, _ALIASES.get(field.name, ()))(command)
        return command

    return decorate


def comma_list(kind):
    """A click callback turning "a,b,c" into [kind(a), kind(b), kind(c)]."""

    def parse(ctx, param, value):
        try:
            return [kind(v.strip()) for v in str(value).split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None

    return parse


def fit_field(name: str) -> dataclasses.Field:
    """The ``FitConfig`` field ``name`` (its default and help, for options that take a list of them)."""
    return next(f for f in fit_config_fields() if f.name == name)
