"""Transfer (part): how bytes move between a slot and a tier.  The codecs (``codec``), batches
of pool tasks that finish together (``futures``), the retrying store every call to a
persistent tier goes through (``store``), a named tier (``tier``), the chunk writer
(``writer``) and the reader of records and chunks (``reader``).  Transfer never decides what
is committed or kept: that is coordination's, above it."""
