"""A trust-service provider for development and tests.

Generates an instance CA, the registry's configuration-signing certificate, an
authentication (TLS) certificate per security server and a signing certificate per
member, into a git-ignored folder. Everything it makes uses standard X.509 so that a
national CA can replace it by configuration. Never use these keys in production.
"""
