"""Idempotency records: the start-by time of a confirmed claim (issue 13 item 8)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("celery_guard", "0005_runs"),
    ]

    operations = [
        migrations.AddField(
            model_name="idempotencyrecord",
            name="start_by",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
