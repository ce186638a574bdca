"""Your own service by reference: ``MODULE:NAME``, as gunicorn and uvicorn
take it (``sockworks serve mymod:Upper -l tcp:127.0.0.1:9000``, or
``service = "mymod:Upper"`` in a config file).

``NAME`` is anything :func:`sockworks.make_driver` serves - a
:class:`StreamProtocol` or :class:`DatagramProtocol` class, an
``async def handle(stream)``, a blocking ``def handle(conn)``, a
:class:`ProtocolDriver` - or a *factory*: a function taking no arguments
that returns one of those. The module is imported from ``app_dir`` (default:
the current directory). Every failure is a :class:`ConfigError` in one line.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any

from ._endpoint import TRANSPORTS
from ._errors import ConfigError

# A dotted module path, a colon, a dotted attribute path.
_REFERENCE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def is_app_reference(text: str) -> bool:
    """True when ``text`` has the form ``MODULE:NAME``."""
    return _REFERENCE.fullmatch(text) is not None


def load_app(reference: str, app_dir: str | os.PathLike[str] | None = None) -> Any:
    """Import ``MODULE:NAME`` from ``app_dir`` and return a handler that
    :func:`sockworks.make_driver` accepts (a factory is called once here).
    Raise :class:`ConfigError` in one line for a bad reference, a module
    that cannot be imported, a missing name, or a name that is not a handler.
    """
    if not is_app_reference(reference):
        raise ConfigError(
            f"{reference!r} is not MODULE:NAME (e.g. mymod:Upper: the name Upper in mymod.py)"
        )
    module_name, _, attr_path = reference.partition(":")
    directory = os.path.abspath(os.fspath(app_dir) if app_dir is not None else os.getcwd())
    if not os.path.isdir(directory):
        raise ConfigError(f"{reference}: {directory} is not a directory (--app-dir, app_dir)")
    # Looked up first, as uvicorn and gunicorn do: the user's module wins
    # over an installed one of the same name.
    if directory not in sys.path:
        sys.path.insert(0, directory)
    importlib.invalidate_caches()  # a module written after start-up is found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            hint = (f" ({module_name}:... looks like an endpoint: give it with -l)"
                    if module_name in TRANSPORTS else " (--app-dir DIR says where)")
            raise ConfigError(
                f"{reference}: no module named {missing!r} in {directory}{hint}"
            ) from None
        failed = f"{reference}: importing {module_name} failed: {_one_line(exc)}"
        raise ConfigError(failed) from None
    except Exception as exc:  # the user's module raised: say what, in one line
        failed = f"{reference}: importing {module_name} failed: {_one_line(exc)}"
        raise ConfigError(failed) from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module_name
            raise ConfigError(f"{reference}: {where} has no {attr_path!r}") from None
    if _is_factory(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(
                f"{reference}: the factory {attr_path}() failed: {_one_line(exc)}"
            ) from None
    return check_handler(obj, reference)


def check_handler(obj: Any, reference: str) -> Any:
    """``obj`` if sockworks can serve it, else a :class:`ConfigError` naming
    what it is and what would do."""
    from ._core import Driver
    from ._drivers import make_driver

    expected = (
        "expected a StreamProtocol or DatagramProtocol class, an async def handle(stream), "
        "a def handle(conn), or a function taking no arguments that returns one"
    )
    if inspect.isclass(obj) and not issubclass(obj, Driver):
        from ._protocol import DatagramProtocol, StreamProtocol

        if not issubclass(obj, (StreamProtocol, DatagramProtocol)):
            raise ConfigError(
                f"{reference}: the class {obj.__name__} is not a handler; {expected}"
            )
    elif not callable(obj) and not isinstance(obj, Driver):
        raise ConfigError(
            f"{reference}: not a handler (an object of type {type(obj).__name__}); {expected}"
        )
    try:
        make_driver(obj)
    except ConfigError as exc:
        raise ConfigError(f"{reference}: {exc}") from None
    return obj


def _is_factory(obj: Any) -> bool:
    """A plain function (not a class, not a coroutine function) that takes
    no arguments at all: a handler always takes its connection."""
    if inspect.isclass(obj) or not callable(obj) or inspect.iscoroutinefunction(obj):
        return False
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind is not p.KEYWORD_ONLY or p.default is p.empty for p in params)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        where = f"{os.path.basename(exc.filename or '?')}, line {exc.lineno}"
        return f"SyntaxError: {exc.msg} ({where})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
