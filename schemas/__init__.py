"""Contracts that cross process boundaries: API <-> workflow <-> activity.

Light modules only (pydantic, stdlib): workflow code imports them through the sandbox.
"""
