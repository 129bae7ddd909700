#!/bin/sh
# One-shot (temporalio/admin-tools): the namespace LockN Tune runs in, and the search
# attributes every run sets (schemas/search_attributes.py), so runs can be filtered in the
# Temporal UI and with `temporal workflow list --query "LocknState='training'"`.
# Safe to run on every start. The temporal CLI reads TEMPORAL_ADDRESS.
set -eu

namespace="${TEMPORAL_NAMESPACE:?}"
retention="${TEMPORAL_RETENTION:-720h}"

until temporal operator cluster health 2>/dev/null | grep -q SERVING; do
    echo "waiting for the Temporal frontend at $TEMPORAL_ADDRESS"
    sleep 2
done

if ! temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1; then
    temporal operator namespace create --namespace "$namespace" --retention "$retention" \
        --description "LockN Tune runs"
fi

# The namespace cache of a fresh server needs a moment before the namespace is usable.
until temporal operator search-attribute list --namespace "$namespace" >/dev/null 2>&1; do
    sleep 1
done

for name in LocknKind LocknProject LocknBaseModel LocknState; do
    if temporal operator search-attribute list --namespace "$namespace" | grep -qw "$name"; then
        echo "search attribute $name exists"
    else
        temporal operator search-attribute create --namespace "$namespace" --name "$name" --type Keyword
    fi
done
echo "namespace $namespace is ready"
