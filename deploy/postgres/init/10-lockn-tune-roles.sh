#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume
# (docker-entrypoint-initdb.d): the roles and database of LockN Tune and the role Temporal
# creates its own databases (temporal, temporal_visibility) with.
set -eu

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v lockn_pw="$LOCKN_DB_PASSWORD" -v temporal_pw="$TEMPORAL_DB_PASSWORD" <<'SQL'
CREATE ROLE lockn_tune LOGIN PASSWORD :'lockn_pw';
CREATE DATABASE lockn_tune OWNER lockn_tune;
CREATE ROLE temporal LOGIN CREATEDB PASSWORD :'temporal_pw';
SQL
