"""PostgreSQL: the limits store's admission as one server-side function (one round trip)."""

from typing import Any

from django.db import migrations

#: The database store's admission (``celery_guard.limits.dbstore``) in one call, so a run is
#: admitted in one round trip instead of five (BEGIN, lock, count, insert, COMMIT).
#:
#: Correctness rests on two properties of PostgreSQL, both covered by the concurrent tests:
#: the scope rows are locked in scope order (the order ``_lock`` uses for the back-offs, so
#: no two callers deadlock), and the function is VOLATILE, so in READ COMMITTED each of its
#: statements takes a new snapshot: the counts, run once the locks are held, see every entry
#: committed by the admissions that held them before. A STABLE function would count with
#: the snapshot of the calling statement and could admit over the limit.
#:
#: Arguments, one array element per rule, in the rules' order: the scope keys, the
#: concurrency (0: none), the rate's count (0: none) and period (seconds); then the lease
#: (seconds) and the holder. Returns whether the run was admitted, else the 1-based index of
#: the first rule that refused it, why (``backoff``, ``concurrency``, ``rate``) and the wait.
ADMIT = """
CREATE OR REPLACE FUNCTION celery_guard_limits_admit(
    p_keys text[], p_concurrency integer[], p_rate integer[], p_period double precision[],
    p_lease double precision, p_holder text,
    OUT admitted boolean, OUT refused integer, OUT kind text, OUT wait double precision
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    k text;
    tries integer;
    now_ double precision;
    b double precision;
    held integer;
    first double precision;
    taken text[] := '{}';
    new_scopes text[] := '{}';
    new_kinds text[] := '{}';
    new_untils double precision[] := '{}';
BEGIN
    admitted := true;
    -- Lock every scope row of the run, in scope order (created when missing).
    FOR k IN SELECT DISTINCT x FROM unnest(p_keys) AS x ORDER BY x LOOP
        tries := 0;
        LOOP
            PERFORM 1 FROM celery_guard_limitscope WHERE scope = k FOR UPDATE;
            EXIT WHEN FOUND;
            tries := tries + 1;
            IF tries > 3 THEN
                RAISE EXCEPTION USING MESSAGE = 'the limit scope ' || k || ' could not be locked';
            END IF;
            -- A scope's first run, or its row was just purged.
            INSERT INTO celery_guard_limitscope (scope, backoff_until) VALUES (k, 0)
                ON CONFLICT (scope) DO NOTHING;
        END LOOP;
    END LOOP;
    -- The clock once the locks are held, as the transaction of the Python path reads it.
    now_ := EXTRACT(EPOCH FROM clock_timestamp())::double precision;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        k := p_keys[i];
        SELECT backoff_until INTO b FROM celery_guard_limitscope WHERE scope = k;
        IF b > now_ THEN
            admitted := false; refused := i; kind := 'backoff'; wait := b - now_;
            RETURN;
        END IF;
        IF p_concurrency[i] > 0 THEN
            SELECT count(*), min(e.until) INTO held, first FROM celery_guard_limitentry e
                WHERE e.scope = k AND e.kind = 'c' AND e.until > now_;
            IF held >= p_concurrency[i] THEN
                admitted := false; refused := i; kind := 'concurrency';
                wait := coalesce(first, now_) - now_;
                RETURN;
            END IF;
            IF NOT (k || ':c') = ANY (taken) THEN
                taken := taken || (k || ':c');
                new_scopes := new_scopes || k;
                new_kinds := new_kinds || 'c'::text;
                new_untils := new_untils || (now_ + p_lease);
            END IF;
        END IF;
        IF p_rate[i] > 0 THEN
            SELECT count(*), min(e.until) INTO held, first FROM celery_guard_limitentry e
                WHERE e.scope = k AND e.kind = 'r' AND e.until > now_;
            IF held >= p_rate[i] THEN
                admitted := false; refused := i; kind := 'rate';
                wait := coalesce(first, now_) - now_;
                RETURN;
            END IF;
            IF NOT (k || ':r') = ANY (taken) THEN
                taken := taken || (k || ':r');
                new_scopes := new_scopes || k;
                new_kinds := new_kinds || 'r'::text;
                new_untils := new_untils || (now_ + p_period[i]);
            END IF;
        END IF;
    END LOOP;
    INSERT INTO celery_guard_limitentry (scope, kind, holder, until)
        SELECT s, t, p_holder, u FROM unnest(new_scopes, new_kinds, new_untils) AS n (s, t, u);
END
$fn$;
"""

DROP = (
    "DROP FUNCTION IF EXISTS celery_guard_limits_admit("
    "text[], integer[], integer[], double precision[], double precision, text)"
)


def create_function(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(ADMIT, None)


def drop_function(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, None)


class Migration(migrations.Migration):
    dependencies = [
        ("celery_guard", "0010_taskpolicy_priority"),
    ]

    operations = [
        migrations.RunPython(create_function, drop_function),
    ]
