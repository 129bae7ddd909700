#!/bin/sh
# One-shot (temporalio/admin-tools): create Temporal's databases on PostgreSQL and bring
# their schemas to the version of this server release. Safe to run on every start.
# temporal-sql-tool reads SQL_PLUGIN, SQL_HOST, SQL_PORT, SQL_USER and SQL_PASSWORD.
set -eu

schema=/etc/temporal/schema/postgresql/v12
until nc -z "$SQL_HOST" "$SQL_PORT"; do
    echo "waiting for PostgreSQL at $SQL_HOST:$SQL_PORT"
    sleep 1
done

temporal-sql-tool --db temporal create
temporal-sql-tool --db temporal setup-schema -v 0.0
temporal-sql-tool --db temporal update-schema -d "$schema/temporal/versioned"

temporal-sql-tool --db temporal_visibility create
temporal-sql-tool --db temporal_visibility setup-schema -v 0.0
temporal-sql-tool --db temporal_visibility update-schema -d "$schema/visibility/versioned"
echo "Temporal schemas are up to date"
