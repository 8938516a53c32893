"""One reproduction per module; only the CLI imports these."""
