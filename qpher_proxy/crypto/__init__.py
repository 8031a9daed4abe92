"""The public half of the crypto suite: algorithm table, backend interface, HPKE key schedule.

Nothing here holds a private key, so both the gateway and the KMS import it. The backends
that do hold private keys live with the KMS, in ``qpher_proxy.kms.worker.backends``.
"""
