"""Every part of the hub that owns tables, imported in one place so that any process that
migrates the database (serve, the CLI, tests, benchmarks) registers every component's
migrations — a process that knew only some would refuse a database the others had upgraded."""

from __future__ import annotations

import central_hub.accounts
import central_hub.audit
import central_hub.export
import central_hub.rollup
import central_hub.signatures
import central_hub.sites
import central_hub.status

COMPONENT_MODULES = (
    central_hub.accounts,
    central_hub.audit,
    central_hub.export,
    central_hub.rollup,
    central_hub.signatures,
    central_hub.sites,
    central_hub.status,
)
