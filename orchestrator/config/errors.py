"""The error every config check raises: the full dotted key and what is allowed."""


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
