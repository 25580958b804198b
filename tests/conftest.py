import os

import pytest


def pytest_report_header(config):
    import django

    return f"Django {django.get_version()}; CI={os.environ.get('CI', '')!r}"


@pytest.fixture(scope="session")
def django_project():
    from tests.djproject.setup import ensure_django

    ensure_django()
