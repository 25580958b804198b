"""The public API is what __all__ says, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import async_handler


def test_all_names_resolve():
    assert set(async_handler.__all__) == {
        "ASYNC_KEY",
        "POOL_KEY",
        "AsyncDjangoApplication",
        "__version__",
    }
    for name in async_handler.__all__:
        assert getattr(async_handler, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    try:
        async_handler.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


HTTP_MODULES = sorted(
    "async_handler.http." + path.stem
    for path in (Path(async_handler.__file__).parent / "http").glob("*.py")
    if path.stem != "__init__"
)


def test_http_package_lists_its_modules():
    assert "async_handler.http.connection" in HTTP_MODULES
    assert len(HTTP_MODULES) >= 8


def test_protocol_layer_imports_neither_django_nor_gunicorn():
    code = (
        "import sys, async_handler, async_handler.protocol, "
        + ", ".join(HTTP_MODULES)
        + ";"
        "print(sorted(m for m in ('django', 'gunicorn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
