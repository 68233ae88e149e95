"""Domain functions: what routes and workers do to models, datasets and jobs.

Each function takes an SQLAlchemy Session, commits its own transaction, and raises the
typed errors of service.errors; none of them knows about HTTP.
"""
