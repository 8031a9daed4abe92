"""Composition: the request pipeline (authenticate -> rate limit -> authorize -> dispatch) and
``serve()``, which starts the KMS workers, the TLS listeners and the HTTP server."""
