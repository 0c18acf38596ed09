"""The DailyPlay benchmark (`python -m bench`)."""
