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

:func:`parts` is the one seam through which tests and benchmarks look inside a live
Checkpointer (its slots, its memory tier, its save worker) instead of reaching for private
attributes: what it returns is the engine's own assembly, not a stable API.

Importing this module needs pytest (a test dependency, not a runtime one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flashckpt.testing.conformance import BackendConformance

if TYPE_CHECKING:
    from flashckpt.checkpointer import Checkpointer
    from flashckpt.coordination.parts import RankParts


def parts(ckpt: Checkpointer) -> RankParts:
    """The parts ``ckpt`` assembled (stager and slots, memory tier, save worker, tiers,
    control, timeline, mirror server).  For tests and diagnostics; training thread."""
    return ckpt._parts


__all__ = ["BackendConformance", "parts"]
