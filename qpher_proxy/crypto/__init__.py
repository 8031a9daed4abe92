"""The crypto suite: algorithm table, backend interface, HPKE key schedule, backends.

``algorithms``, ``interface`` and ``hpke`` hold no private keys and may be imported by
the gateway. ``backends`` (and everything under it) holds private keys: KMS side only.
"""
