"""Replication (part): copies of each rank's snapshot in peers' host memory.  Which ranks hold
a rank's copies (``placement``), the authenticated wire (``wire``), the client that pushes and
fetches (``client``), the server each rank runs (``server``) and what it holds
(``holdings``: peers' mirrors and orphaned shard directories, on staging's memory tier).
Nothing below it imports it."""
