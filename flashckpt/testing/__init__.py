"""Test helpers shipped with flashckpt, for backend authors and the project's own tests.

:class:`BackendConformance` is the backend conformance suite (the pattern of fsspec's
``tests/abstract``): subclass it in a pytest module and give it a ``backend`` fixture that
yields a fresh, empty backend; every test of the suite then runs against it::

    class TestMyBackend(flashckpt.testing.BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            be = MyBackend(tmp_path)
            yield be
            be.close()

Importing this module needs pytest (a test dependency, not a runtime one).
"""

from flashckpt.testing.conformance import BackendConformance

__all__ = ["BackendConformance"]
