"""One file per method; each registers itself with ``@register(name)`` (see ``kvcompress.registry``)."""
