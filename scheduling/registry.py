"""Named policies and their knobs, shared by the engine's schedulers and the balancer's routers:
registration by decorator, construction with knob overrides, and one command-line flag per knob
(`--<policy>-<knob>`), so adding a policy touches no other file."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil


@dataclasses.dataclass
class Knobs:
    """Base for a policy's tunables. Each field's default is its paper's."""


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def deco(cls):
            cls.name = name
            self[name] = cls
            return cls
        return deco

    def load(self, package) -> None:
        """Import every module of `package`; each registers its policy."""
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")

    def lookup(self, name: str, knobs=None):
        """The class called `name` and its Knobs (given, or defaults overridden by a dict)."""
        try:
            cls = self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(sorted(self))}") from None
        if knobs is None or isinstance(knobs, dict):
            knobs = cls.Knobs(**(knobs or {}))
        return cls, knobs


def add_knob_flags(parser: argparse.ArgumentParser, registry: Registry) -> None:
    group = parser.add_argument_group(f"{registry.kind} policy knobs")
    for policy, cls in sorted(registry.items()):
        for f in dataclasses.fields(cls.Knobs):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = dict(dest=f"knob:{registry.kind}:{policy}:{f.name}", default=None, help=f"default {default!r}")
            flag = f"--{policy}-{f.name}".replace("_", "-")
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                kind = type(default) if default is not None else float
                group.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **kwargs)


def knob_values(args: argparse.Namespace, registry: Registry, policy: str) -> dict:
    """The knobs of `policy` set on the command line."""
    prefix = f"knob:{registry.kind}:{policy}:"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
