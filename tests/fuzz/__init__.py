"""Fuzzing harnesses run by hand (not collected by pytest): see atheris_decode.py."""
