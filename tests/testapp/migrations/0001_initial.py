from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Execution",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("task", models.CharField(max_length=200)),
                ("label", models.CharField(max_length=200)),
                ("queue", models.CharField(max_length=200)),
                ("hostname", models.CharField(max_length=200)),
                ("guard_header", models.JSONField(null=True)),
                ("started_at", models.FloatField()),
                ("finished_at", models.FloatField()),
            ],
        ),
    ]
