"""recflow: events in, recommendations out."""

__version__ = "0.1.0"
