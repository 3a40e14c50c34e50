"""Static files of the built-in pages (served by idios.api.pages)."""
