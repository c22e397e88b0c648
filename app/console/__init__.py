"""The operator console: server-rendered pages under ``/console`` (see ``routes``)."""

from app.console.routes import router

__all__ = ["router"]
