"""Exceptions for bad user input: each names what is wrong and where (field, file, line)."""


class UserError(Exception):
    """Bad input from the user (config, data, model path, launch shape). Printed without a traceback."""


class ConfigError(UserError):
    """A config field is unknown, mistyped or inconsistent with another field or the world size."""


class DataError(UserError):
    """A dataset record is malformed, lacks a field, or is too long."""


class ModelError(UserError):
    """A model path does not exist, is not an HF folder, or names an unsupported architecture."""


class PeerLost(UserError):
    """Another rank died or stopped answering: this rank stops instead of waiting forever."""
