"""Lifecycle service: starts, watches and stops engine processes; registers them for traffic."""
