"""The per-instance registry: members, servers, services, agreements and the signed
global configuration it publishes to security servers (fetch and push).

It never imports `security_server` or `certs`: they meet only on the wire.
"""
