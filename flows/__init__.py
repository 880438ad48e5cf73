"""Prefect flows over the DVC stages (docs/flows.md)."""

import os

# Prefect's ephemeral API gets 20 s to start, which a busy 2-core machine overshoots ("Timed out while attempting
# to connect to ephemeral Prefect API server"); set before prefect is imported, a user's own value wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
