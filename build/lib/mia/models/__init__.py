"""Architectures: the repository's own files (package data, loaded by path), builder discovery for any
bundle's checkpoints (``registry``) and loading victims (``loading``)."""
