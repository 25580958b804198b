"""The montage example's app: async views, a streaming feed and an async-ORM form."""
