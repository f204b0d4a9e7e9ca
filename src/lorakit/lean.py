"""Modules switched to a leaner forward of the same computation, in place.

A lean module's class becomes a subclass of its own class (one per class and forward, under the
same names: repr, isinstance and state dicts are unchanged) whose forward is the lean one, so that
all the layers of a model still share one forward (torch.compile compiles a block once). The plain
class stays reachable as `plain_class`, its forward as `plain_forward`, for the cases where the
lean forward steps aside. A lean module pickles and deep-copies as one of its subclass: the pickle
names the plain class, the only one an unpickling process can import.

gated_mlp and rms_norm define lean forwards; add_lora switches them on, merge_and_unload off.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from typing import Callable

from torch import nn


def forward_code(cls: type) -> str | None:
    """The body of cls.forward(self, x) as code without docstrings or whitespace, its input renamed x,
    to compare with a known forward (None if the source cannot be read or forward takes more)."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(function, ast.FunctionDef) or len(function.args.args) != 2:
        return None
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    code = "".join(ast.unparse(s) for s in body).replace(" ", "")
    return re.sub(rf"\b{function.args.args[1].arg}\b", "x", code)


def make_lean(model: nn.Module, applies: Callable[[nn.Module], bool], forward: Callable) -> int:
    """Give every module of `model` for which `applies` holds the lean `forward`; returns how many
    run it. A module whose forward is replaced on the instance (accelerate's device hooks) is left
    as it is."""
    count = 0
    for module in model.modules():
        if not is_lean(module) and applies(module) and "forward" not in module.__dict__:
            module.__class__ = lean_class(type(module), forward)
        count += is_lean(module, forward)
    return count


def is_lean(module: nn.Module, forward: Callable | None = None) -> bool:
    """Does `module` run a lean forward (`forward`, if given)?"""
    cls = type(module)
    return "plain_class" in vars(cls) and (forward is None or cls.forward is forward)


def restore(model: nn.Module) -> None:
    """Undo make_lean: every module computes with its class's forward again."""
    for module in model.modules():
        if is_lean(module):
            module.__class__ = type(module).plain_class


@functools.lru_cache(maxsize=None)
def lean_class(cls: type, forward: Callable) -> type:
    """cls with `forward`, under cls's own names."""
    return type(cls.__name__, (cls,), {"forward": forward, "plain_forward": cls.forward, "plain_class": cls,
                                       "__reduce_ex__": _reduce_lean, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _reduce_lean(module: nn.Module, protocol: int):
    """Pickle / deepcopy a lean module as object's own reduce would, naming the plain class and the
    lean forward (a module-level function, pickled by name); _new_lean makes it lean again."""
    cls = type(module)
    return _new_lean, (cls.plain_class, cls.forward), module.__dict__


def _new_lean(cls: type, forward: Callable) -> nn.Module:
    lean = lean_class(cls, forward)
    return lean.__new__(lean)
