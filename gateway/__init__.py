"""The shared core of the gateway, sans-IO.

Identifiers, envelopes and their canonical bytes, signing and verification, the agreement
decision, the global-configuration model, the audit chain and the error hierarchy. This
package never opens a socket, starts an event loop, reads the clock or draws randomness
that is not passed in, and never imports grpc or aiohttp.
"""
