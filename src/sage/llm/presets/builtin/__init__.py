"""Built-in presets, shipped as YAML files next to this module."""
