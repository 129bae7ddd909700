"""The HTTP API: validates, records, and starts/queries/cancels workflows. Never trains."""
