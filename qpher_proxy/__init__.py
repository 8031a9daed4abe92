"""qpher-proxy: a post-quantum crypto gateway.

Two processes, one boundary: the gateway (TLS, HTTP, auth, policy, API) and the KMS
(private keys, KEK, key files). See ARCHITECTURE in the README.
"""

__version__ = "0.1.0"
