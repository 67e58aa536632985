"""Staging (part): a state into host memory at the cost of a copy.  The state walk
(``statewalk``: flatten a state into tensors and a tree, load one back in place), the
shared-memory slots and the copy (``stager``: layout, slots, prefault, pinning), and the
memory tier (``memory_tier``: the one owner of which slot holds which step, and of the
memory manifests).  Staging never does I/O beyond its own shared memory (test_layers)."""
