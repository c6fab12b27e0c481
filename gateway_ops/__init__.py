"""The operations port every long-running process opens: `/metrics`, `/healthz`, `/readyz`.

Not in `gateway/` (the core never serves HTTP); imported by `security_server`, `registry`
and the trust services of `gateway pki serve` alike, so that every process is observed the
same way.
"""
