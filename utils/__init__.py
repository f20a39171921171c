"""Shared code of the StellarByte scripts: configuration, data, training, logging and reports."""
