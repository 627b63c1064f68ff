"""Training of the cross-modal hashing models (needs the ``train`` extra)."""
