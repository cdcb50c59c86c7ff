"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (usage, config, data, checkpoint). Its message is the whole report."""


class ConfigError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")


class DataError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"data error: {message}")


class CheckpointError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"checkpoint error: {message}")
