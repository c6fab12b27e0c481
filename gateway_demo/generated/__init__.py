"""GENERATED protobuf modules of the demo's sample services: do not edit (`make proto`)."""
