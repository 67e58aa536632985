"""Replication (part): copies of each rank's snapshot in peers' host memory (``mirror``:
placement, the authenticated transport, the server holding peers' copies, the client that
pushes and fetches).  Built on staging's memory tier; nothing below it imports it."""
