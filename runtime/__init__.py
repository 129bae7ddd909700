"""What every process does at start: logging, and its connection to Temporal."""
