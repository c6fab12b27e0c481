"""Clients of the gateway's own HTTP APIs, over the wire only (see admin.py)."""
