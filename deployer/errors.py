class AdapterError(Exception):
    """The one error the adapters raise: a plain message safe to show a user.

    Adapters (AWS, SSH) translate every library exception into this, so the
    engine handles one thing and no library detail (or secret) leaks upward.
    The message is redacted here, once, wherever it is shown later.
    """

    def __init__(self, message: str = "", *args):
        from deployer.redact import Redactor

        super().__init__(Redactor().text(str(message)) if message else message, *args)


class Cancelled(AdapterError):
    """A person cancelled while the command ran.

    Its own class so the engine can tell a cancel (roll back, quietly) from a
    failure; still an AdapterError, so code that knows only that one stops too.
    """
