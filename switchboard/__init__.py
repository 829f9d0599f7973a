"""Switchboard: the live-streaming gateway of a voice and messaging AI platform."""

__version__ = "0.1.0"
