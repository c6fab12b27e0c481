"""The per-agency security server: an asyncio process with a consumer endpoint for local
backends, a mutual-TLS provider endpoint for peer servers, a durable hash-chained message
log and a client of the registry's signed configuration.

It never imports `registry` or `certs`: they meet only on the wire.
"""
