"""Coordination (part): what every tier holds and which snapshot to restore from where
(``inventory``, ``reshard``), the save worker (``worker``: the persist thread) and what it
reports (``handle``), the commit protocol (``commit``), chunks written once across saves
and ranks (``dedup``), the pushes to the peers' mirrors (``mirrors``) and retention
(``retention``).  Built on transfer, replication and staging; nothing below imports it."""
