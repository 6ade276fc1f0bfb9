"""What every flag module shares: the error type and the boolean and positivity helpers.

No torch or Megatron here (nor in any flag module): `fusedkv-pretrain --help` imports only the
flag modules.
"""

from __future__ import annotations

import argparse


class ArgumentError(ValueError):
    """A configuration that cannot run, with the fix in the message."""


class Switch(argparse.BooleanOptionalAction):
    """BooleanOptionalAction decides by a "--no-" prefix, so a flag that is itself named
    "--no-x" (--no-load-optim) could never be switched on; decide by the exact spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])


def add_bool(parser_group, flag: str, help: str) -> None:
    """A boolean flag that also takes a `--no-` form (so a command line can undo a YAML)."""
    parser_group.add_argument(flag, action=Switch, default=False, help=help)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named value, when set, must be > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')}={value} must be > 0")


def flag(dest: str) -> str:
    """The command-line spelling of an argparse dest: num_layers -> --num-layers."""
    return "--" + dest.replace("_", "-")
