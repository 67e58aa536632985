"""Transfer (part): how bytes move between a slot and a tier.  The codecs (``codec``), batches
of pool tasks that finish together (``futures``), and the retrying store every call to a
persistent tier goes through (``store``).  The persist thread itself (``flashckpt._transfer``)
moves here as it is split (issue 11)."""
