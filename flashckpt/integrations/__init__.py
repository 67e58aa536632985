"""Framework integrations: ``flashckpt.integrations.lightning`` (PyTorch Lightning) and
``flashckpt.integrations.transformers`` (Hugging Face Transformers).

Each imports its framework only when it is used: ``import flashckpt`` (and this package)
never pulls Lightning or Transformers in.  They stand on the frameworks' public seams and
on flashckpt's public API only (see docs/integrations.md).
"""
