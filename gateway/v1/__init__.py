"""GENERATED protobuf message modules for package gateway.v1: do not edit.

Regenerate with `make proto` from the sources in `proto/`; a test fails when these files
differ from what the sources generate.
"""
