"""``ferryman admin`` commands as data, and the argparse parsers built from them.

Most commands are one call to the admin API whose answer is printed. Such a ``Command`` is
a row of data: its word and help, its arguments (``arg`` and ``one_of`` take what
``add_argument`` takes), the HTTP method, the path (``{field}`` filled from the argument of
that name, URL-quoted), how the body and the query are built from the arguments, and how
the answer is shown to people (``show(data, args, ctx)``; ``--json`` prints the API's JSON
instead). A command that does more (several calls, files, password prompts) names its own
function instead (``run``).

A ``Group`` is a resource word (``apps``) with its commands (``list``, ``show``, ...);
``add_commands`` adds groups and commands to the ``ferryman admin`` parser in the order
given, each command's parser carrying the connection options too (``common``).
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .client import quote
from .output import Ctx

Render = Callable[[Any, argparse.Namespace, Ctx], str]  # (the API's answer, the arguments, the context) -> text


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class OneOf:
    """Mutually exclusive arguments (``add_mutually_exclusive_group``)."""

    args: tuple[Arg, ...]
    required: bool = False


def one_of(*args: Arg, required: bool = False) -> OneOf:
    return OneOf(args, required)


@dataclass(frozen=True)
class Command:
    """One command: ``ferryman admin GROUP NAME ...`` (or ``ferryman admin NAME ...`` outside a group)."""

    name: str
    help: str
    args: tuple[Arg | OneOf, ...] = ()
    method: str = "GET"
    path: str = ""
    body: Callable[[argparse.Namespace], Any] | None = None
    query: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    show: Render | None = None
    run: Callable[[Ctx, argparse.Namespace], int] | None = None  # a command that is more than one call
    description: str | None = None  # the parser's description, when it is not ``help``

    def __call__(self, ctx: Ctx, args: argparse.Namespace) -> int:
        if self.run is not None:
            return self.run(ctx, args)
        assert self.show is not None, self.name
        show = self.show
        body = None if self.body is None else self.body(args)
        query = None if self.query is None else self.query(args)
        ctx.show(ctx.client.call(self.method, path_of(self.path, args), body, query),
                 lambda data: show(data, args, ctx))
        return 0


@dataclass(frozen=True)
class Group:
    """A resource word and its commands."""

    name: str
    help: str
    commands: tuple[Command, ...]


def path_of(template: str, args: argparse.Namespace) -> str:
    """``template`` with each ``{field}`` replaced by that argument, URL-quoted."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return template.format_map({name: quote(getattr(args, name)) for name in names})


def shown(render: Callable[[Any], str]) -> Render:
    """Show the answer with ``render`` (which needs nothing else)."""
    return lambda data, _args, _ctx: render(data)


def said(message: Callable[[argparse.Namespace], str]) -> Render:
    """Say ``message(args)``: for changes the API answers without a body (``--json`` prints nothing)."""
    return lambda _data, args, _ctx: message(args)


def add_commands(resources: Any, common: argparse.ArgumentParser, items: Sequence[Group | Command]) -> None:
    """Add ``items`` to ``resources`` (the ``ferryman admin`` subparsers), in order."""
    for item in items:
        if isinstance(item, Group):
            parser = resources.add_parser(item.name, help=item.help, description=item.help, parents=[common])
            commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
            for command in item.commands:
                _add_command(commands, common, command)
        else:
            _add_command(resources, common, item)


def _add_command(subparsers: Any, common: argparse.ArgumentParser, command: Command) -> None:
    parser = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help,
                                   parents=[common])
    parser.set_defaults(func=command)
    for item in command.args:
        if isinstance(item, OneOf):
            group = parser.add_mutually_exclusive_group(required=item.required)
            for one in item.args:
                group.add_argument(*one.flags, **one.options)
        else:
            parser.add_argument(*item.flags, **item.options)
