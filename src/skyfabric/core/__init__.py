"""Core types shared by every part of skyfabric: the fleet file, endpoints and failure domains, errors.

Everything else depends on this package; it depends on nothing else in skyfabric.
"""
