"""The montage example project: async Django views served from a plain ``wsgi.py``."""
