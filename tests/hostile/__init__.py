"""Hostile records, after safetensors' ``attacks/``: named manifests, commit records and
checkpoint trees that must be refused (``cases.py``), the helpers that write them into a real
POSIX tier (``tree.py``), a script that writes them to a folder for inspection or as a seed
corpus (``generate.py``), and the tests (``test_hostile.py``).  Nothing here is a stored
binary: every file is generated from a valid record by a named mutation."""
