"""twinkle-server: the HTTP server that trains LoRA adapters for remote ``twinkle_client`` users.

Installed under the import name ``twinkle_server``; run it with ``twinkle-server serve``.
"""

from twinkle import __version__

__all__ = ["__version__"]
