"""The migrations match the models: ``makemigrations --check`` finds nothing to write."""

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db
@pytest.mark.parametrize("app_label", ["celery_guard", "testapp"])
def test_no_migration_is_missing(app_label):
    out = io.StringIO()
    # --check exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", app_label, "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
