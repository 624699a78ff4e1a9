"""What tests share: fakes, builders, the misbehaving stage and the real-daemon peer.

Test modules import from here, never from one another (nor from ``tests.conftest``, which only
holds fixtures).
"""
