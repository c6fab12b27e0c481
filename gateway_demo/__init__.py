"""The demonstration: sample backend services, a runner that starts a whole topology as
real processes, the `gateway demo` script and the `gateway bench` benchmark.

Not part of the product: it exists to show and measure the product.
"""
