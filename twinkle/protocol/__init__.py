"""The contract every layer shares, and nothing that needs torch.

``errors`` (the error tree, codes and HTTP statuses), ``wire`` (the pydantic models of every
request and reply), ``codec`` (how values travel), ``names`` (what names and ids may look
like, ``twinkle://`` paths), ``limits`` (sizes both sides agree on), ``dataset_meta`` and
``outputs`` (the values that cross the wire) and ``api`` (each API method's signature and
behaviour, declared once). The library, the server, the client and the notebook layer all
import it; it imports none of them, and importing it never imports torch.
"""
