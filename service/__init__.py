"""Yilian (医联): a FHIR R4 gateway for medical alliances."""

__version__ = "0.1.0"
