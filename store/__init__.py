"""Where state lives outside Temporal: the metadata DB and the artifact store."""
