class AdapterError(Exception):
    """The one error the adapters raise: a plain message safe to show a user.

    Adapters (AWS, SSH) translate every library exception into this, so the
    engine handles one thing and no library detail (or secret) leaks upward.
    """
