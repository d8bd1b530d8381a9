"""Masking free text needs no service: short values are left alone."""

from celery_guard.core import redaction


def test_short_values_are_not_masked_in_text():
    assert redaction.mask_text("id 123 of 1234", {"123"}) == "id 123 of 1234"
    assert redaction.mask_text("a 'x\\ny-z' b", {"x\ny-z"}) == f"a '{redaction.MASK}' b"
