"""Data: reading record files, turning records into conversations."""
