"""The random number generators of a training process, as a ``Stateful`` a state can hold.

``state = {"model": model, "optim": optim, "rng": flashckpt.RNGState()}`` makes a resumed run
draw the same numbers as an uninterrupted one: dropout masks, data shuffles and
augmentations come out the same.  Captured: torch's CPU generator, every CUDA device's
generator (when CUDA is initialized), Python's ``random`` and NumPy's global generator (when
NumPy is installed).  Each rank saves its own streams (a rank's shard holds its state).
Training thread only, like every ``Stateful`` the state walk calls.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


class RNGState:
    """A ``Stateful`` (``state_dict`` / ``load_state_dict``) of the process's global random
    generators: torch CPU and CUDA, Python ``random``, NumPy.  ``load_state_dict`` sets them
    as they were when ``state_dict`` was taken; a generator saved but absent now (no CUDA, no
    NumPy, fewer devices) is left alone with a warning."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        out: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        np = _numpy()
        if np is not None:
            kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
            out["numpy"] = {
                "kind": str(kind),
                "keys": torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy()),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(_byte_tensor(state["torch"]))
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        if "cuda" in state:
            saved = list(state["cuda"])
            if torch.cuda.is_available():
                n = torch.cuda.device_count()
                if n != len(saved):
                    log.warning(
                        "flashckpt: RNG state of %d CUDA devices saved, %d here: the first %d restored",
                        len(saved),
                        n,
                        min(n, len(saved)),
                    )
                for i, s in enumerate(saved[:n]):
                    torch.cuda.set_rng_state(_byte_tensor(s), i)
            else:
                log.warning("flashckpt: CUDA RNG state saved, but CUDA is not available here: not restored")
        if "numpy" in state:
            np = _numpy()
            if np is None:
                log.warning("flashckpt: NumPy RNG state saved, but NumPy is not installed here: not restored")
                return
            s = state["numpy"]
            keys = s["keys"].cpu().numpy().view(np.uint32)
            np.random.set_state(
                (s["kind"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"]))
            )


def _byte_tensor(t: Any) -> torch.Tensor:
    """A generator state as torch wants it: a contiguous CPU ``uint8`` tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise TypeError(f"an RNG state must be a uint8 tensor, got {type(t).__name__}")
    return t.detach().cpu().contiguous()


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
