"""The `gateway` command: one entry point for every process and tool of the project.

It only parses arguments, configures logging and the event loop, and calls into
`certs`, `registry`, `security_server` and `gateway_demo`, importing each lazily so that a
command loads only what it needs.
"""
