"""SAGE control-plane services, one package per responsibility (`sage.services.<name>`)."""
