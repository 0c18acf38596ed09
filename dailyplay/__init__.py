"""DailyPlay: a self-hosted session-token service for one-time game plays."""

__version__ = "0.1.0"
