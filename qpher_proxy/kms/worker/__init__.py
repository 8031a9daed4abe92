"""A KMS worker process: the only code that reads key files, the KEK and private keys.

``__main__``   ``python -m qpher_proxy.kms.worker``: hardening first, then ``service``
``service``    the worker loop around the sans-I/O protocol (one socketpair, blocking I/O)
``keystore``   the key store: metadata + sealed key files (theory of operation), ``KeyStore``
``tenant_keys``  the tenant-scoped repository (``TenantKeys``): every key operation
``keydb``      the store's database, directory lock and KEK check
``key_rules``  the lifecycle rules both stores share (checks, transitions, ``KeyInfo``)
``key_import``  key import (BYOK): import-job key pairs, unwrapping and checking imported keys
``pg_keystore``  the store on PostgreSQL (``storage.backend: postgresql``): ``PgKeyStore``,
               ``PgTenantKeys``; imported only with that backend (it needs psycopg)
``lease``      the cluster-wide sweep lease with a fencing token (PostgreSQL)
``kek_rotation``  the offline re-wrap of every key file under a new KEK
``keyfile``    the sealed key-file format; ``kek``: KEK providers and the canary
``admin``      offline commands (``init``, ``kms rotate-kek``), imported lazily by the CLI
``backends/``  crypto backends holding private key objects (liboqs, OpenSSL)

Nothing outside this package imports it, except the offline commands ``.importlinter``
names. This ``__init__`` imports nothing, so that ``python -m qpher_proxy.kms.worker`` runs
its hardening before any other module is loaded.
"""
