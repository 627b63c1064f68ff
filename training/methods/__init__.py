"""The published methods, one module each (egath, tegah, hfah). Each registers itself
with ``cmhash.training.method.register_method``; ``get_method(name)`` imports it on
first use. A new method is one more module here (see docs/architecture.md)."""
